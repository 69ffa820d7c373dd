"""Evaluate a checkpoint: `python -m aomd.evaluate checkpoint=<path> [dataset=...]`.

Prints Recall@K and MAP@R on the dataset's test split and writes them to a JSON file.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aomd.build import load_data
from aomd.cli import run_task, start
from aomd.config import config_dir, validate
from aomd.engine import evaluate as evaluate_split
from aomd.metrics import selection_metric
from aomd.models import load_model
from aomd.runtime import Runtime

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> float:
    cfg = validate(cfg)
    runtime = Runtime.from_train(cfg.train)
    model = load_model(cfg.checkpoint, runtime.device)  # fails early, before any data is read, on a bad checkpoint
    data = load_data(cfg.dataset, None, cfg.eval)
    trained_on = model.input or {}
    expected = {"dataset": data.name, "base_size": data.base_size, "image_size": data.image_size}
    for warning in mismatch_warnings(cfg.checkpoint, trained_on, expected, training_dataset(Path(cfg.checkpoint)),
                                     OmegaConf.to_container(cfg.dataset, resolve=True)):
        log.warning(warning)
    metrics = evaluate_split(model, data.test, data.image_size, cfg.eval, runtime, cfg.train.progress)
    output = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "evaluation.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "architecture": model.architecture.as_dict(),
              "input": expected, "trained_on": trained_on or None, "dataset": data.summary(), "metrics": metrics}
    output.write_text(json.dumps(result, indent=2))
    print(f"{model.architecture.backbone}-{model.architecture.embedding_size} on {data.name} test "
          f"({data.summary()['test_images']} images):")
    for key, value in metrics.items():
        print(f"  {key:>10}  {100 * value:6.2f}")
    print(f"written to {output}")
    return metrics[selection_metric(cfg.eval.recall_k)]


# dataset keys that say where and how the data is read, not which data it is
READING_KEYS = {"cache_dir", "in_memory", "decode_workers", "progress"}


def mismatch_warnings(checkpoint: str, trained_on: dict, expected: dict, trained: dict | None, evaluated: dict) -> list[str]:
    """What differs between the data `checkpoint` was trained on and this evaluation's: the images
    (`trained_on`, recorded in the checkpoint, against `expected`: dataset name, base_size,
    image_size), then all the overrides that give the evaluation the training run's data (from
    the run's `dataset` settings `trained`, against `evaluated`; the sizes again among them)."""
    warnings = []
    if trained_on and any(trained_on.get(key) != value for key, value in expected.items()):
        # another dataset may be the point (transfer); other sizes rarely are
        warnings.append(f"{checkpoint} was trained on {trained_on.get('dataset')} images of {trained_on.get('base_size')} px "
                        f"cropped to {trained_on.get('image_size')} px; this evaluation reads {expected['dataset']} at "
                        f"{expected['base_size']} px cropped to {expected['image_size']} px (dataset.base_size, dataset.image_size).")
    differences = dataset_differences(trained, evaluated)
    if differences:
        warnings.append(f"{checkpoint} was trained with other dataset settings than this evaluation's: pass "
                        f"{' '.join(differences)} to evaluate on the data it was trained on.")
    return warnings


def training_dataset(checkpoint: Path) -> dict | None:
    """The `dataset` settings of the run that wrote `checkpoint`, from its `.hydra/config.yaml`
    (a run's `checkpoints/<name>.pt`); None for a checkpoint kept elsewhere."""
    config = checkpoint.expanduser().resolve().parent.parent / ".hydra" / "config.yaml"
    try:
        dataset = OmegaConf.to_container(OmegaConf.load(config)).get("dataset")
    except (OSError, ValueError, OmegaConfBaseException):
        return None
    return dataset if isinstance(dataset, dict) else None


def dataset_differences(trained: dict | None, evaluated: dict) -> list[str]:
    """The overrides (`dataset.<key>=<trained value>`) that give the evaluation the data its
    network was trained on; none when the run's settings are unknown or name another dataset."""
    if not trained or trained.get("_target_") != evaluated.get("_target_"):
        return []
    keys = sorted((set(trained) | set(evaluated)) - READING_KEYS - {"_target_"})
    unresolved = {key for key, value in trained.items() if isinstance(value, str) and "${" in value}  # as written, not as run
    return [f"dataset.{key}={_override_value(trained.get(key))}" for key in keys
            if key not in unresolved and trained.get(key) != evaluated.get(key)]


def _override_value(value) -> str:
    return "null" if value is None else json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict, bool)) else str(value)


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(evaluate, cfg, "aomd.evaluate")


if __name__ == "__main__":
    start(sys.argv[1:], "evaluate", "aomd.evaluate")
    main()
