"""Topography measured while a model trains (train.py's evaluation hook) and read back (development.py).

At every evaluation of train.py the raw model (never its compiled or DDP-wrapped form) is measured by
the analysis's own functions (topolm.analysis) on inputs analyze.py accepts too, so that
`analyze.py ckpt=<that step's checkpoint> heldout_tokens=N seed=S stimuli=F null_shuffles=K` reports the
same numbers (`analyze_keys` gives that command's keys):

- held-out windows: `heldout_windows` of the run's val.bin (analyze.py's default held-out text for a
  checkpoint of the run), `topography_heldout_tokens` tokens, windows of min(block_size - 1, 256),
  drawn from `topography_seed`;
- per site, on their correlations (`heldout_correlations`): the full-grid spatial loss
  (`full_grid_spatial_loss`), and the mean correlation of adjacent and of far unit pairs
  (`correlation_by_distance`);
- per site and contrast of `topography_stimuli` (a small stimulus set shipped in stimuli/small/: S and N
  of the localizer), Moran's I of the t-map (`stimulus_measures`, `morans_i`) and the mean of its
  shuffled-position null (`null_morans_i`, `topography_null_shuffles` shuffles per site drawn as
  analyze.py draws them, so the null equals analyze.py's `null_i`). Moran's I needs GPT-2's token ids
  (the stimuli are English text); a model of other ids (tokenizer field not GPT-2) has none, said once.
  Every window and stimulus starts with `<|endoftext|>` (id 50256), as in the analysis: a model whose
  vocabulary has no such id is not measured at all (said once at the start).

No permutation p-values are computed (they cost `permutations` Moran's I each and do not change I).
Every rank computes the same numbers from the same weights (under DDP the ranks hold identical weights),
so no rank waits in a collective for another; rank 0 writes them. The record in log.jsonl is the
event `topography`; figures (`draw_maps`) are drawn by rank 0 at `topography_image_interval`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from topolm.analysis import (SheetCells, Stimuli, StatisticsKeys, contrast_names, correlation_by_distance,
                             defined_mean, distance_bin_edges, full_grid_spatial_loss, heldout_correlations,
                             heldout_windows, morans_i, null_morans_i, stimulus_measures, undefined_map)
from topolm.config import Checked, UserError, require
from topolm.stimuli import STIMULI_DIR
from topolm.tokenizer import EOT_TOKEN

REPO = STIMULI_DIR.parent
DEFAULT_STIMULI = "stimuli/small/localizer.tsv"
Q = 0.05  # analyze.py's default q: the selective units marked on the maps
EVENT = "topography"
MAPS_FOLDER = "topography"  # the run folder's subfolder of the maps' images


@dataclass
class TopographyKeys(Checked):
    """train.py's keys of the topography measured at every evaluation (topolm.topography)."""
    topography: bool = True
    """Measure the topography of the model at every evaluation (log.jsonl's `topography` events, wandb's topo/
    scalars): per site the full-grid spatial loss, the adjacent and far correlations on held-out text, and
    Moran's I of each contrast of `topography_stimuli` with its null (GPT-2 token ids only). false: off."""
    topography_heldout_tokens: int = 2048
    """Held-out tokens of val.bin the correlations and the spatial loss are measured on (analyze.py's
    heldout_tokens)."""
    topography_stimuli: str = DEFAULT_STIMULI
    """Stimulus sets of the Moran's I (analyze.py's stimuli; the default, 24 sentences and 24 nonword lists of the
    shipped localizer, gives S - N). A relative path not found in the current folder is looked up in the
    repository."""
    topography_null_shuffles: int = 10
    """Shuffles of the unit positions per site for the null of Moran's I (analyze.py's null_shuffles)."""
    topography_seed: int = 0
    """Seed of the held-out windows and the shuffles (analyze.py's seed; its default 0)."""
    topography_image_interval: int = 2000
    """Also draw every site's t-map (one image, topolm.figures.plot_maps) at the evaluations whose iteration is a
    multiple of this, and at the last: into <run folder>/topography/maps-<iter>.png and, with wandb_log, as the
    wandb image topo/maps. 0: no images. Needs Moran's I (GPT-2 token ids)."""

    def __post_init__(self):
        super().__post_init__()
        require(self.topography_heldout_tokens >= 16,
                f"topography_heldout_tokens={self.topography_heldout_tokens} must be >= 16")
        require(self.topography_null_shuffles >= 2,
                f"topography_null_shuffles={self.topography_null_shuffles} must be >= 2")
        require(self.topography_image_interval >= 0,
                f"topography_image_interval={self.topography_image_interval} must be >= 0 (0: no images)")
        require(0 <= self.topography_seed <= 2**32 - 1, f"topography_seed={self.topography_seed} must be in "
                                                       f"[0, 2**32 - 1]")


def stimuli_spec(spec: str) -> str:
    """`spec` (comma-separated stimulus files or folders) with each relative entry not found in the current folder
    but found in the repository given as the repository's path; 'stimuli' stays the shipped folder."""
    entries = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        if entry != "stimuli" and not Path(entry).is_absolute() and not Path(entry).exists() \
                and (REPO / entry).exists():
            entry = str(REPO / entry)
        entries.append(entry)
    return ",".join(entries)


def analyze_keys(cfg) -> list[str]:
    """analyze.py's keys that measure what the run logged (`cfg`: a TopographyKeys)."""
    return [f"heldout_tokens={cfg.topography_heldout_tokens}", f"seed={cfg.topography_seed}",
            f"stimuli={stimuli_spec(cfg.topography_stimuli)}", f"null_shuffles={cfg.topography_null_shuffles}"]


def read_stimuli(spec: str, key: str = "topography_stimuli") -> Stimuli:
    """The stimulus sets of `spec` as analyze.py reads them (its headline contrasts where declared; the
    localizer's S - N always), tokenized. Raises UserError naming `key`."""
    from topolm.stimsets import read_sets, select_contrasts
    from topolm.tokenizer import gpt2_encoding

    spec = stimuli_spec(spec)
    try:
        sets = read_sets(spec, Path("."), STIMULI_DIR)
        return Stimuli.build(sets, select_contrasts(sets, ""), gpt2_encoding())
    except (OSError, ValueError) as e:
        raise UserError(f"{key}={spec}: {e}") from e


class Measurer:
    """The fixed inputs of one run's topography measures, built before anything is written.

    val_path: the run's val.bin; block_size of the model; stimuli: None for a model without GPT-2's
    token ids (then `note` says why Moran's I is left out)."""

    def __init__(self, cfg, val_path: Path, block_size: int, gpt2_ids: bool):
        self.cfg = cfg
        tokens = np.memmap(val_path, dtype=np.uint16, mode="r")
        if len(tokens) < 16:
            raise UserError(f"topography: {val_path} has only {len(tokens)} tokens; the held-out correlations need "
                            f"at least 16 (or set topography=false)")
        seq_len = min(block_size - 1, 256)
        self.windows = heldout_windows(tokens, cfg.topography_heldout_tokens, seq_len, cfg.topography_seed)
        self.stim, self.note = None, None
        if gpt2_ids:
            self.stim = read_stimuli(cfg.topography_stimuli).fitting(block_size)[0]
        else:
            self.note = ("topography: the model's token ids are not GPT-2's, so Moran's I of the stimuli's contrasts "
                         "is not measured (the spatial loss and the correlations are)")

    @torch.no_grad()
    def measure(self, model) -> tuple[dict, dict | None]:
        """The log record's measures of `model` (a GPT, put in eval mode and back) and the arrays a map image
        needs (None without stimuli)."""
        was_training = model.training
        model.eval()
        try:
            return measure(model, self.windows, self.stim, self.cfg.topography_null_shuffles, self.cfg.topography_seed)
        finally:
            model.train(was_training)

    def image_due(self, it: int, last_iter: int) -> bool:
        interval = self.cfg.topography_image_interval
        return self.stim is not None and interval > 0 and (it % interval == 0 or it == last_iter)


def measure(model, windows: np.ndarray, stim: Stimuli | None, null_shuffles: int, seed: int) -> tuple[dict, dict | None]:
    """Per site and averaged over sites: spatial_loss, adjacent_corr, far_corr and, per contrast of `stim`,
    {morans_i, null_i} (as analyze.py's summary.json: a site whose map is undefined has NaN and its reason under
    `undefined`; the mean takes the defined sites and the null of the mean the same sites per shuffle).

    model: a GPT in eval mode; windows (n, seq_len) held-out token ids; stim: None measures no Moran's I.
    Returns (record, arrays): arrays has site_names, coords, t_<contrast>, selective_localizer, moran_<contrast>
    (analyze.py's units.npz keys, for topolm.figures.plot_maps); None without stim."""
    start = time.perf_counter()
    names = list(model.site_names)
    coords = model.sheet.unit_coords.cpu().numpy().astype(np.int64)
    corr, n_samples = heldout_correlations(model, windows)
    arrays = map_arrays(model, stim) if stim is not None else None
    rng = np.random.default_rng(seed)
    edges = distance_bin_edges(coords.reshape(-1, 2))
    contrasts = contrast_names(arrays) if arrays is not None else []
    sites, nulls = {}, {c: [] for c in contrasts}
    for s, name in enumerate(names):
        # drawn for every site, as measure_model draws them, so the null is analyze.py's
        perms = np.stack([rng.permutation(len(coords[s])) for _ in range(null_shuffles)])
        curve = correlation_by_distance(corr[s], coords[s], edges)
        entry = {"spatial_loss": full_grid_spatial_loss(corr[s], coords[s], model.config.radius, model.config.sheet),
                 "adjacent_corr": curve["adjacent"], "far_corr": curve["far"]}
        cells = SheetCells.from_coords(coords[s])
        for c in contrasts:
            t, i = arrays[f"t_{c}"][s], arrays[f"moran_{c}"][s]
            null = null_morans_i(t, cells, cells.unit_cell[perms])
            reason = undefined_map(t, arrays.get(f"n_items_{c}"), arrays.get(f"n_left_out_{c}"))
            if reason or math.isnan(i):
                entry[c] = {"morans_i": math.nan, "null_i": math.nan,
                            "undefined": reason or "the map on the sheet's cells is constant"}
                arrays[f"moran_{c}"][s] = math.nan
            else:
                entry[c] = {"morans_i": float(i), "null_i": defined_mean(null)}
            nulls[c].append(null)
        sites[name] = entry
    mean = {k: float(np.mean([e[k] for e in sites.values()])) for k in ("spatial_loss", "adjacent_corr", "far_corr")}
    for c in contrasts:
        i = arrays[f"moran_{c}"]
        defined = ~np.isnan(i)
        null_means = np.stack(nulls[c], axis=1)[:, defined].mean(axis=1) if defined.any() else np.full(1, math.nan)
        mean[c] = {"morans_i": defined_mean(i), "null_i": defined_mean(null_means),
                   "sites_undefined": int((~defined).sum())}
    record = {"sites": sites, "mean": mean, "heldout_samples": int(n_samples),
              "contrasts": {str(c): str(lab) for c, lab in zip(arrays["contrasts"], arrays["contrast_labels"])}
              if arrays is not None else {}}
    record["seconds"] = time.perf_counter() - start
    return record, arrays


@torch.no_grad()
def map_arrays(model, stim: Stimuli) -> dict:
    """Every site's t-map of each contrast of `stim` and its Moran's I: `stimulus_measures`' arrays with
    site_names, coords and moran_<contrast> (n_sites,) (analyze.py's units.npz keys, for topolm.figures).
    model: a GPT in eval mode."""
    arrays, _ = stimulus_measures(model, stim, Q, stats=StatisticsKeys())
    coords = model.sheet.unit_coords.cpu().numpy().astype(np.int64)
    arrays.update(site_names=np.array(list(model.site_names)), coords=coords)
    for c in contrast_names(arrays):
        arrays[f"moran_{c}"] = np.array([morans_i(arrays[f"t_{c}"][s], coords[s], 0).i for s in range(len(coords))])
    return arrays


def wandb_scalars(record: dict) -> dict:
    """wandb's topo/ scalars of a record: per site topo/<measure>/<site> and the site mean topo/<measure>
    (measures sl, adjacent, far, moran_<contrast>, moran_<contrast>_null)."""
    out = {}
    for where, entry in [("", record["mean"])] + [(f"/{n}", e) for n, e in record["sites"].items()]:
        for key, short in (("spatial_loss", "sl"), ("adjacent_corr", "adjacent"), ("far_corr", "far")):
            out[f"topo/{short}{where}"] = entry[key]
        for c in record["contrasts"]:
            out[f"topo/moran_{c}{where}"] = entry[c]["morans_i"]
            out[f"topo/moran_{c}_null{where}"] = entry[c]["null_i"]
    return out


class _Titled:
    """What topolm.figures.plot_maps reads of a model: the model itself and a title."""

    def __init__(self, model, title: str):
        self.model, self.title, self.label = model, title, "model"


def draw_maps(model, arrays: dict, title: str, contrast: str | None = None):
    """One figure of every site's t-map of `contrast` (default the first measured: S - N) at one step
    (topolm.figures.plot_maps). Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    from topolm.figures import plot_maps

    contrast = contrast or contrast_names(arrays)[0]
    return plot_maps([(_Titled(model, title), arrays)], contrast, Q)


def maps_path(run_dir: Path, it: int) -> Path:
    return Path(run_dir) / MAPS_FOLDER / f"maps-{it:07d}.png"


class TrainingHook:
    """train.py's evaluation hook: measure at every evaluation, log on rank 0, draw the maps at their interval.

    Built by `start` before anything is written (None when topography=false)."""

    def __init__(self, measurer: Measurer, run_dir: Path, is_main: bool, last_iter: int):
        self.measurer, self.run_dir, self.is_main, self.last_iter = measurer, Path(run_dir), is_main, last_iter
        self.noted = False

    @classmethod
    def start(cls, cfg, val_path: Path, block_size: int, vocab_size: int, gpt2_ids: bool, run_dir: Path,
              is_main: bool, say=print):
        """The hook, or None: with topography=false, and (said with `say`) for a model whose vocabulary has no
        `<|endoftext|>` (vocab_size <= 50256), which the analysis runs every window after."""
        if not cfg.topography:
            return None
        if vocab_size <= EOT_TOKEN:
            say(f"topography: not measured: the model's vocab_size={vocab_size} has no <|endoftext|> (id {EOT_TOKEN}), "
                f"which the analysis's held-out windows and stimuli start with")
            return None
        return cls(Measurer(cfg, val_path, block_size, gpt2_ids), run_dir, is_main, cfg.max_iters)

    def __call__(self, raw_model, it: int, log, wandb_run, say=print) -> dict:
        """Measure `raw_model` after `it` steps; rank 0 writes the record to `log` (a JsonLog) and `wandb_run`.
        Returns the record."""
        from topolm.figures import json_safe, save_figure

        record, arrays = self.measurer.measure(raw_model)
        if self.measurer.note and not self.noted:
            say(self.measurer.note)
            self.noted = True
        image = None
        if self.is_main and arrays is not None and self.measurer.image_due(it, self.last_iter):
            t0 = time.perf_counter()
            image = maps_path(self.run_dir, it)
            save_figure(draw_maps(raw_model, arrays, f"{self.run_dir.name} (step {it})"), image)
            record["image"] = {"path": str(image.relative_to(self.run_dir)), "seconds": time.perf_counter() - t0}
        if not self.is_main:
            return record
        log.write(event=EVENT, iter=it, **json_safe(record))
        m = record["mean"]
        say(f"step {it}: topography: spatial loss {m['spatial_loss']:.4f}, adjacent r {m['adjacent_corr']:.3f}, far r "
            f"{m['far_corr']:.3f}" + "".join(f", Moran's I {c} {m[c]['morans_i']:.3f} (null {m[c]['null_i']:.3f})"
                                            for c in record["contrasts"]) + f" ({record['seconds']:.2f} s)")
        scalars = wandb_scalars(record)
        if image is not None and wandb_run.id is not None:
            import wandb
            scalars["topo/maps"] = wandb.Image(str(image), caption=f"step {it}")
        wandb_run.log(scalars, step=it)
        return record


# ----------------------------------------------------------------------------- reading a run's log

def read_records(log_path: Path, event: str) -> dict[int, dict]:
    """The records of one event in a log.jsonl, by iteration; a resumed run's repeated iteration keeps the last."""
    import json

    out = {}
    lines = Path(log_path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a last line cut by a kill
            raise UserError(f"{log_path} line {n} is not JSON; the log is damaged")
        if record.get("event") == event:
            out[int(record["iter"])] = record
    return dict(sorted(out.items()))
