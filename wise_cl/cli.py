"""`wise-cl`: the LightningCLI of lifelong editing (`fit` edits the stream then scores it, `test` scores,
`predict` answers prompts with the edited model) and `wise-cl export RUN OUT` (an edited model to use)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from wise_cl.checkpoints import verified_checkpoint
from wise_cl.data import EditStreamDataModule
from wise_cl.models import ModelLoadError
from wise_cl.module import EditingModule
from wise_cl.provenance import code_version
from wise_cl.serving import export_edited

# Lightning warnings that do not apply to editing runs (frozen eval-mode model, text batches, no optimizer)
HARMLESS_WARNINGS = (
    r".*module\(s\) in eval mode.*",
    r".*overridden `transfer_batch_to_device`.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*does not have many workers.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*configure_optimizers` returned `None`.*",
)
# Lightning's loggers of rank-zero messages, which also carry its advertising tips
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# what a user's input can raise: unusable data or options, a model or layer that cannot be found
USER_ERRORS = (ValueError, LookupError, TypeError, OSError, ModelLoadError)
TABLE_KEYS = (
    "reliability",
    "generalization",
    "ood_generalization",
    "locality",
    "exact_match",
    "answer_match",
    "rephrase_answer_match",
    "generation_locality",
    "perplexity",
)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config into the log folder, except a `predict`'s into a run folder that has one."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and Path(trainer.log_dir or ".", self.config_filename).is_file():
            return
        super().setup(trainer, pl_module, stage)


class WiseCLI(LightningCLI):
    """LightningCLI whose `fit` and `test` end by writing `metrics.json` into the log folder and whose `predict`
    writes `predictions.jsonl` there (validation has no meaning for an edit stream)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: kwargs for name, kwargs in LightningCLI.subcommands().items() if name != "validate"}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Without a terminal (nohup, a pipe) progress goes to the log as tqdm lines: Rich draws nothing there."""
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and not sys.stdout.isatty():
            trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar()
        return trainer

    def before_instantiate_classes(self) -> None:
        """`--ckpt_path last` is the newest `last.ckpt` of the config's run name (of its version, when named); a
        resumed run logs into the folder of the run it resumes (a TensorBoard logger's save_dir, name and version).
        A `fit` without `ckpt_path` is refused a named version whose folder holds a checkpoint: it would start over
        on it."""
        config = self.config.get(str(self.subcommand), self.config)
        if "weights_only" in config:  # checkpoints hold tensors and plain values: load nothing else
            config.weights_only = True
        logger = config.trainer.logger
        init = logger.init_args if logger and "TensorBoardLogger" in str(logger.class_path) else None
        named = None  # the checkpoint of a named version (a TensorBoard logger's `version`)
        if init is not None and init.get("version") is not None:
            named = Path(init.save_dir, init.name, str(init.version), "checkpoints", "last.ckpt")
        if not config.get("ckpt_path"):
            if self.subcommand == "fit" and named is not None and named.is_file():
                raise ValueError(
                    f"{named.parent.parent} already holds a run (checkpoints/last.ckpt): resume it with"
                    " --ckpt_path last, or start a new one under another --trainer.logger.init_args.version"
                )
            return
        if config.ckpt_path == "last":
            if init is None:
                raise ValueError("ckpt_path: 'last' needs the TensorBoard logger, which names the run folders")
            runs = Path(init.save_dir, init.name)
            candidates = (
                [named] if named else sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
            )
            found = [path for path in candidates if path.is_file()]
            if not found:
                raise ValueError(f"ckpt_path: 'last', but {runs} holds no */checkpoints/last.ckpt")
            config.ckpt_path = str(found[-1])
        verified_checkpoint(config.ckpt_path)
        checkpoints = Path(config.ckpt_path).parent
        if init is not None and checkpoints.name == "checkpoints":
            run = checkpoints.parent
            init.save_dir, init.name, init.version = str(run.parent.parent), run.parent.name, run.name

    def before_fit(self) -> None:
        self.record_config()

    def before_test(self) -> None:
        self.record_config()

    def record_config(self) -> None:
        """Hand the run's resolved config and the code it starts from to the module: checkpoints and
        metrics.json keep them."""
        config = self.config.get(str(self.subcommand), self.config)
        self.model.run_config = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
        self.commit = code_version()  # taken now: the checkout may move on while a long run goes

    def after_fit(self) -> None:
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self.write_metrics()

    def after_test(self) -> None:
        self.write_metrics()

    def after_predict(self) -> None:
        folder = Path(self.trainer.log_dir or ".")
        drop_empty_hparams(folder)
        print(folder / "predictions.jsonl")

    def write_metrics(self) -> None:
        summary = {**self.model.summary(), "commit": self.commit, "config": self.model.run_config}
        folder = Path(self.trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        drop_empty_hparams(folder)
        print(format_table(summary))
        print(path)


def drop_empty_hparams(folder: Path) -> None:
    """The module logs no hyperparameters, so TensorBoard's hparams.yaml is empty: config.yaml is the config."""
    hparams = folder / "hparams.yaml"
    if hparams.is_file() and not yaml.safe_load(hparams.read_text()):
        hparams.unlink()


def format_table(summary: dict[str, Any]) -> str:
    """The scores as a small aligned table."""
    rows = [(k, summary[k]) for k in TABLE_KEYS if k in summary]
    rows += [(k, summary[k]) for k in ("num_edits", "edit_seconds_median") if summary.get(k) is not None]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def run(args: list[str] | None = None) -> WiseCLI:
    """Run `wise-cl` with `args` (default: the command line); the returned CLI's `model.summary()`
    holds the run's scores and `trainer.log_dir` its folder."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in RANK_ZERO_LOGGERS:
        if _not_a_tip not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_not_a_tip)
    return WiseCLI(
        EditingModule,
        EditStreamDataModule,
        args=args,
        seed_everything_default=0,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_epochs": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "accelerator": "auto",
        },
    )


def main(args: list[str] | None = None) -> None:
    """The `wise-cl` command: a user's mistake (bad data, option, model or layer) ends in a short message
    naming it; `--verbose` shows the traceback instead. `--prompt TEXT` (repeatable) sets `data.prompts`."""
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        if argv[:1] == ["export"]:
            export(argv[1:])
        else:
            run(prompts_as_data_option(argv))
    except USER_ERRORS as error:
        if verbose:
            raise
        sys.exit(f"wise-cl: error: {short_message(error)}\n(add --verbose for the traceback)")


def export(args: list[str]) -> None:
    """`wise-cl export RUN OUT`: a WISE run's side memories and routing settings, for `wise_cl.load_edited`."""
    parser = argparse.ArgumentParser(prog="wise-cl export", description=export.__doc__)
    parser.add_argument("run", type=Path, help="a WISE run folder or its checkpoints/last.ckpt")
    parser.add_argument("out", type=Path, help="the folder to write")
    options = parser.parse_args(args)
    print(export_edited(options.run, options.out))


def prompts_as_data_option(argv: list[str]) -> list[str]:
    """`--prompt A --prompt B` as `--data.prompts=["A", "B"]`."""
    prompts, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == "--prompt":
            prompts.append(next(args, ""))
        elif arg.startswith("--prompt="):
            prompts.append(arg.removeprefix("--prompt="))
        else:
            rest.append(arg)
    return [*rest, f"--data.prompts={json.dumps(prompts)}"] if prompts else rest


def short_message(error: BaseException) -> str:
    """The error's message; when a config value fits none of an option's types (jsonargparse lists each type's
    complaint and dumps the value), only the complaints that are not about the `None` alternative."""
    text = str(error)
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    reasons = [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ") and "NoneType" not in line]
    return "; ".join(reasons) or text


if __name__ == "__main__":
    main()
