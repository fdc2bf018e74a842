"""Topography over training: the measures train.py logged at every evaluation against step, and the maps of
chosen steps side by side.

    python development.py run=out/<run>
    python development.py run=out/<run> steps=0,500,1000 out=figures/<run>-development

Reads the run folder's log.jsonl: the task loss of every evaluation (`eval` events) and the topography measured
there (`topography` events, topolm.topography: per site and averaged over sites the full-grid spatial loss, the
adjacent and far correlation on held-out text and Moran's I of each contrast with its shuffled-position null);
and its checkpoints. Writes into `out` (default figures/<run folder name>-development):
- development.json: those measures against step, site means and per site, the values of the log (a step
  evaluated twice, as by a resumed run, counts with its last evaluation);
- development.png: task loss (train, val), Moran's I per contrast with its null, adjacent and far correlation and
  spatial loss against step;
- maps.png: every site's t-map of the first contrast at the chosen steps (`steps`: each needs its checkpoint, see
  train.py's keep_last and keep_every), measured on the checkpoints by the functions and the stimulus sets of
  the run's own topography keys; left out, with a note, for a model whose token ids are not GPT-2's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from topolm.config import DeviceKey, UserError, cli_main, load_config, require, resolve_device

MAX_DEFAULT_MAPS = 6


@dataclass
class DevelopmentConfig(DeviceKey):
    """development.py's keys: its own below, device from topolm.config.DeviceKey."""
    run: str = ""
    """Run folder of train.py (its log.jsonl and checkpoints)."""
    out: str = ""
    """Output folder, relative to the current folder; empty: figures/<run folder name>-development."""
    steps: str = ""
    """Steps whose maps maps.png shows, comma-separated (each needs its checkpoint ckpt-<step>.pt); empty: up to
    6 of the run's checkpoints, spread from the first to the last; 'none': no maps."""

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.run), "run= is required: the folder of a train.py run (e.g. run=out/shakespeare)")
        if self.steps not in ("", "none"):
            try:
                [int(x) for x in self.steps.split(",")]
            except ValueError:
                raise ValueError(f"steps={self.steps}: give steps as comma-separated integers (e.g. steps=0,500,1000), "
                                 f"or none") from None


def curves(run: Path) -> dict:
    """development.json's measures from the run's log.jsonl. Raises UserError for a log without evaluations."""
    from topolm.topography import EVENT, read_records

    log = run / "log.jsonl"
    if not log.is_file():
        raise UserError(f"run={run}: no log.jsonl there; name the folder of a train.py run")
    evals, topo = read_records(log, "eval"), read_records(log, EVENT)
    if not evals:
        raise UserError(f"run={run}: its log.jsonl holds no evaluation yet")
    contrasts = {}
    for record in topo.values():
        contrasts.update(record.get("contrasts") or {})
    keys = ("spatial_loss", "adjacent_corr", "far_corr")

    def series(entries: list[dict]) -> dict:
        out = {k: [e[k] for e in entries] for k in keys}
        for c in contrasts:
            out[c] = {k: [(e.get(c) or {}).get(k) for e in entries] for k in ("morans_i", "null_i")}
        return out

    sites = list(next(iter(topo.values()))["sites"]) if topo else []
    return {"run": str(run), "steps": list(evals),
            "task_loss": {split: [e[split]["task"] for e in evals.values()] for split in ("train", "val")},
            "contrasts": contrasts,
            "topography": {"steps": list(topo), "mean": series([r["mean"] for r in topo.values()]),
                           "sites": {s: series([r["sites"][s] for r in topo.values()]) for s in sites}}}


def chosen_checkpoints(run: Path, steps: str) -> list[tuple[int, Path]]:
    """(step, checkpoint) of the maps: `steps` (UserError naming a step without its checkpoint), or up to
    MAX_DEFAULT_MAPS of the run's checkpoints spread from the first to the last."""
    from topolm.checkpoint import checkpoint_iter, list_checkpoints

    found = {checkpoint_iter(p): p for p in list_checkpoints(run)}
    if steps == "none":
        return []
    if steps:
        wanted = [int(x) for x in steps.split(",")]
        missing = [s for s in wanted if s not in found]
        if missing:
            raise UserError(f"steps={steps}: no checkpoint of step {', '.join(map(str, missing))} in {run} (its "
                            f"checkpoints: {', '.join(map(str, found)) or 'none'}; train.py's keep_every keeps more)")
        return [(s, found[s]) for s in wanted]
    items = sorted(found.items())
    if len(items) > MAX_DEFAULT_MAPS:
        picks = sorted({round(k * (len(items) - 1) / (MAX_DEFAULT_MAPS - 1)) for k in range(MAX_DEFAULT_MAPS)})
        items = [items[k] for k in picks]
    return items


def step_maps(chosen: list[tuple[int, Path]], device: str) -> tuple[list[dict], object, str | None]:
    """topolm.topography.map_arrays of every chosen checkpoint, with the run's topography_stimuli; the last
    model (for its shape) and None, or ([], None, why) for a model without GPT-2's token ids."""
    from topolm.checkpoint import load_model
    from topolm.topography import DEFAULT_STIMULI, map_arrays, read_stimuli

    arrays, model, stim = [], None, None
    for step, path in chosen:
        model, ckpt, _ = load_model(path, device)
        if (ckpt.get("tokenizer") or {}).get("name") != "gpt2":
            return [], None, f"maps.png is not drawn: {path} is a model of token ids that are not GPT-2's"
        if stim is None:
            spec = (ckpt.get("config") or {}).get("topography_stimuli") or DEFAULT_STIMULI
            stim = read_stimuli(spec)
        arrays.append(map_arrays(model, stim.fitting(model.config.block_size)[0]))
        print(f"step {step}: maps of {path}")
    return arrays, model, None


def main(argv: list[str]) -> None:
    cfg: DevelopmentConfig = load_config(DevelopmentConfig, argv)
    run = Path(cfg.run)
    if not run.is_dir():
        raise UserError(f"run={run}: folder not found")
    out = Path(cfg.out) if cfg.out else Path("figures") / f"{run.resolve().name}-development"
    dev = curves(run)
    chosen = chosen_checkpoints(run, cfg.steps)
    device = resolve_device(cfg.device)

    import matplotlib
    matplotlib.use("Agg")
    from topolm.figures import json_safe, plot_development, plot_maps_over_steps, save_figure
    from topolm.files import atomic_write, require_writable
    from topolm.topography import Q

    require_writable(out)
    arrays, model, skipped = step_maps(chosen, device)
    if arrays:
        contrast = str(arrays[0]["contrasts"][0])
        save_figure(plot_maps_over_steps(model.config, [s for s, _ in chosen], arrays, contrast, Q, run.name),
                    out / "maps.png")
        dev["maps"] = {"file": "maps.png", "contrast": contrast, "steps": [s for s, _ in chosen],
                       "checkpoints": [str(p) for _, p in chosen],
                       "morans_i": {str(s): [float(x) for x in a[f"moran_{contrast}"]] for (s, _), a in zip(chosen, arrays)}}
    else:
        dev["maps"] = {"skipped": skipped or "no checkpoint chosen (steps=none, or the run has none)"}
        print(dev["maps"]["skipped"])
    save_figure(plot_development(dev, f"{run.name}: topography over training"), out / "development.png")
    atomic_write(out / "development.json", json.dumps(json_safe(dev), indent=2) + "\n")
    print(f"{len(dev['steps'])} evaluations, {len(dev['topography']['steps'])} with topography; wrote "
          f"{out / 'development.json'}, {out / 'development.png'}" + (f", {out / 'maps.png'}" if arrays else ""))


if __name__ == "__main__":
    cli_main(main)
