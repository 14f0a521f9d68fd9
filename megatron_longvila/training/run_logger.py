"""What a run shows and records: a progress bar, TensorBoard scalars, a JSONL of every step.

Only rank 0 writes. ``metrics.jsonl`` (one JSON object per optimizer step: loss, learning rate,
gradient norm, tokens/s, memory, the sample keys of the step, its videos' frame counts and the
frames each rank's vision tower encoded) is what tests and people read
back; TensorBoard and wandb (if installed and asked for) get the same scalars. A run resumed at
step ``k`` first cuts the file back to steps ``<= k`` (write-temp-then-rename), so every step
appears once: the steps after the checkpoint are recorded again by the resumed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_longvila.checkpoint.manager import write_text_atomically


class RunLogger:
    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str = "longvila",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self._bar = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics = out / "metrics.jsonl"
        truncate_metrics(metrics, start_step)
        self._jsonl = metrics.open("a", encoding="utf-8")
        self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                tqdm.write("wandb was asked for but is not installed; logging without it")
            else:
                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def step(self, step: int, scalars: dict[str, float], extra: dict[str, Any]) -> None:
        """Record optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars, **extra}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        self._bar.update(step - self._bar.n)
        shown = {k: scalars[k] for k in ("loss", "lr", "tokens_per_s", "mem_gb") if k in scalars}
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps ``<= last_step`` in ``path`` (atomically; a line cut by
    a crash is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))
