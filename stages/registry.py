"""Register an evaluated model and move the champion alias only on improvement."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages.config import PipelineError

log = logging.getLogger(__name__)

ACCURACY_TAG = "test_accuracy"  # on each model version: its test-set accuracy
TEST_SET_TAG = "test_set"  # on each model version: digest of the images scored
MANUAL_MOVE = (
    "MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
)


def champion_score(
    client: MlflowClient, name: str, alias: str
) -> tuple[int | None, float | None, str | None]:
    """The alias's version, its recorded accuracy and test set, or Nones.

    A champion without a readable accuracy tag (set by hand, say) scores None.
    """
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or no such alias yet
        return None, None, None
    test_set = version.tags.get(TEST_SET_TAG)
    try:
        return int(version.version), float(version.tags[ACCURACY_TAG]), test_set
    except (KeyError, ValueError):
        log.warning("%s@%s has no readable %s tag", name, alias, ACCURACY_TAG)
        return int(version.version), None, test_set


def promote_if_better(
    model_uri: str, test_accuracy: float, name: str, alias: str, test_set: str
) -> dict[str, Any]:
    """Register `model_uri` under `name`; point `alias` at it if it beats the champion.

    Beating means a strictly higher accuracy than the champion's on the same
    test set (`test_set`, a digest of the images scored), or there being no
    champion with a recorded accuracy. Scores on different test sets are not
    compared: the champion stays, with a warning. Both scores and the
    decision are logged to the active run and returned.
    """
    if mlflow.active_run() is None:
        raise PipelineError("promote_if_better needs an active MLflow run")
    client = MlflowClient()
    old_version, old_accuracy, old_test_set = champion_score(client, name, alias)
    version = int(mlflow.register_model(model_uri, name).version)
    for key, value in ((ACCURACY_TAG, test_accuracy), (TEST_SET_TAG, test_set)):
        client.set_model_version_tag(name, str(version), key, str(value))
    comparable = old_accuracy is None or old_test_set == test_set
    promoted = old_accuracy is None or (comparable and test_accuracy > old_accuracy)
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    elif not comparable:
        log.warning(
            "%s@%s was scored on another test set; its accuracy is not comparable, "
            "so the alias stays. To move it by hand: %s",
            name,
            alias,
            MANUAL_MOVE.format(name=name, alias=alias),
        )
    decision = {
        "registered_model": name,
        "version": version,
        "test_accuracy": float(test_accuracy),
        "alias": alias,
        "champion_version": old_version,
        "champion_test_accuracy": old_accuracy,
        "comparable": comparable,
        "promoted": promoted,
    }
    _log_decision(decision)
    return decision


def _log_decision(decision: dict[str, Any]) -> None:
    """Scores as metrics, the rest as tags of the active run."""
    metrics = {"registry.candidate_test_accuracy": decision["test_accuracy"]}
    if decision["champion_test_accuracy"] is not None:
        metrics["registry.champion_test_accuracy"] = decision["champion_test_accuracy"]
    mlflow.log_metrics(metrics)
    mlflow.set_tags(
        {
            "registry.model": decision["registered_model"],
            "registry.version": decision["version"],
            "registry.alias": decision["alias"],
            "registry.champion_version": decision["champion_version"] or "none",
            "registry.decision": _decision_word(decision),
        }
    )
    log.info(
        "%s version %s (accuracy %.4f) vs champion %s (%s): %s",
        decision["registered_model"],
        decision["version"],
        decision["test_accuracy"],
        decision["champion_version"],
        decision["champion_test_accuracy"],
        _decision_word(decision),
    )


def _decision_word(decision: dict[str, Any]) -> str:
    if decision["promoted"]:
        return "promoted"
    return "kept" if decision["comparable"] else "kept: not comparable"
