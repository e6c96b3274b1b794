"""The run directory, the unit of resumption: what it holds, how a run checks it, and the stage
checkpoints it is written and restored from.

After each stage it gets the stage's checkpoint (trainable weights + method state), the stage's
predictions and finally ``state.json``, written last and atomically: a run killed at any point
resumes from the last stage whose state.json entry exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mcit.config import RunConfig, dump_config
from mcit.errors import McitError
from mcit.models.tuning import load_trainable_state, trainable_state
from mcit.utils import atomic_write_json, atomic_write_text, flatten, remove_stale_temporaries

STATE = "state.json"
# what a run writes into its directory: --restart removes these and nothing else
RUN_FILES = (STATE, "config.yaml", "results.json", "report.md", "report.html", "matrix.png", "checkpoints",
             "predictions", "tracking")


def progress(state: dict) -> str:
    done = max(0, len(state.get("rows", [])) - 1)
    return f"{done} of {len(state.get('tasks', []))} tasks finished"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def check(self, cfg: RunConfig, config_hash: str, resume: bool, restart: bool) -> dict | None:
        """The recorded state to resume from, None to start afresh; refuses what would lose work."""
        if resume and restart:
            raise McitError("--resume and --restart exclude each other: continue the run, or start it over")
        state_path = self.path / STATE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if restart:
                return None
            if not resume:
                raise McitError(f"{self.path} already holds a run ({progress(state)}); pass --resume to continue it, "
                                "--restart to start it over, or choose another --out")
            if state.get("config_hash") != config_hash:
                raise McitError(
                    f"{self.path} was started with another config ({self.config_changes(cfg)}); resume needs the same "
                    "config and overrides, or pass --restart to start it over with this one"
                )
            return state
        if self.path.exists() and not self.path.is_dir():
            raise McitError(f"--out {self.path}: is a file, not a folder")
        strangers = ([p.name for p in self.path.iterdir() if p.name not in RUN_FILES and ".tmp" not in p.name]
                     if self.path.is_dir() else [])
        if strangers and not resume:
            raise McitError(f"{self.path} exists and holds other files ({', '.join(sorted(strangers)[:3])}); "
                            "choose another --out")
        return None  # nothing recorded (a run that failed before its first row, or none): start afresh

    def config_changes(self, cfg: RunConfig) -> str:
        """What differs between the run directory's config and ``cfg``, as 'key: old -> new'."""
        import yaml

        path = self.path / "config.yaml"
        if not path.is_file():
            return "its config.yaml is gone"
        try:
            old = flatten(RunConfig.model_validate(yaml.safe_load(path.read_text())).model_dump(mode="json"))
        except Exception:  # a config of another mcit version: compare the raw keys
            old = flatten(yaml.safe_load(path.read_text()) or {})
        new = flatten(cfg.model_dump(mode="json"))
        changes = [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in dict.fromkeys([*old, *new])
                   if old.get(k) != new.get(k) and k.split(".")[0] not in ("name", "threads", "trackers", "log_every")]
        if not changes:
            return "the same keys, but another starting model (a rebuilt start)"
        return "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")

    def clear(self) -> None:
        """--restart, or nothing recorded: remove what an earlier attempt wrote (its files only)."""
        for name in RUN_FILES:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def open(self, cfg: RunConfig, fresh: bool, cache_dir: Path) -> None:
        """Make the directory ready to write (main process): an earlier attempt's files gone when
        starting afresh, a killed attempt's temporaries removed, the config written."""
        if fresh:
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path, recursive=True, owned=True)  # what a killed attempt left
        for folder in ("base", "data", "similarity"):
            remove_stale_temporaries(cache_dir / folder)
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))

    def write_stage(self, stage: int, state: dict, evals, method, model) -> None:
        """A finished row: its checkpoint (``state['checkpoint']``: the bare model's trainable
        weights and the method's state, renamed into place whole), predictions, then the state."""
        from safetensors.torch import save_file

        if stage > 0 and method.walk != "none":
            ckpt = self.path / state["checkpoint"]
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            tensors, meta = method.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "method.safetensors"))
            atomic_write_json(tmp / "method.json", meta)
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
        pred_dir = self.path / "predictions" / f"row_{stage:02d}"
        for ev in evals:
            atomic_write_text(pred_dir / f"{ev.task}.jsonl", "".join(json.dumps(r) + "\n" for r in ev.predictions))
        atomic_write_json(self.path / STATE, state)

    def restore(self, state: dict, method, model) -> None:
        """The last recorded stage's weights (into the bare ``model``) and method state."""
        from safetensors.torch import load_file

        ckpt = state.get("checkpoint")
        if not ckpt:
            return
        ckpt = self.path / ckpt
        load_trainable_state(model, load_file(str(ckpt / "trainable.safetensors")))
        # cloned into fresh memory: a tensor read from a checkpoint can sit at an unaligned offset, and
        # MKL's last bits follow the layout (uncloned, fwd_prompt's next basis after a resume differed
        # by 1e-15 on an idle machine)
        tensors = {k: v.clone() for k, v in load_file(str(ckpt / "method.safetensors")).items()}
        method.load_state_dict(tensors, json.loads((ckpt / "method.json").read_text()))


__all__ = ["RUN_FILES", "STATE", "RunDirectory", "progress"]
