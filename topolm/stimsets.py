"""Stimulus sets and their contrasts as data (docs/analysis.md, "Stimulus sets and contrasts").

A stimulus set is a list of items, each with a text, labels (`factor=level`, e.g. `class=noun`), the
character span where its response is read (None: the whole text), its sample (rows sharing a sample are
averaged into one sample of the t-test: a target word over its carrier frames) and its match key (rows
sharing one leave together when one does not fit a model's block). It declares named groups (a
conjunction of labels) and contrasts (two sides, each a group, a conjunction of labels or a level).

Readers (every one returns a `StimulusSet`; `read_any` picks one by the file's header):
- `read_set`: this project's format, a tab-separated file with columns `text` and `labels`, optional
  `target`, `frame` and `item`, `# group` / `# contrast` lines above the header; a set named `localizer`
  is read as the localizer (`as_localizer`);
- `read_shipped_localizer`, `read_shipped_pos`: the shipped stimuli/localizer.tsv and stimuli/pos.tsv, sets
  of this format, with the names their items have in errors;
- `read_evlab`, `read_fedorenko2010`, `read_moseley`, `read_elli`: the research code's layouts.
Errors: ValueError naming the file (and line) and what is wrong; FileNotFoundError for a missing file.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from topolm.files import read_text

LOCALIZER = "localizer"
LOCALIZER_CONDITIONS = ("S", "W", "J", "N")
FRAME_SLOT = "___"
SET_COLUMNS = ("text", "labels")
SET_OPTIONAL = ("target", "frame", "item")
# The paper's contrasts of the localizer's conditions; S - N keeps the name `localizer` (units.npz's t_localizer).
LOCALIZER_CONTRASTS = {"localizer": ("S", "N"), "S_J": ("S", "J"), "W_N": ("W", "N"), "S_W": ("S", "W"),
                       "J_N": ("J", "N"), "J_W": ("J", "W")}
HEADLINE = ("localizer", "verb_noun")


@dataclass
class Item:
    text: str
    labels: dict[str, str]
    span: tuple[int, int] | None
    sample: str
    match: str
    label: str  # names the item in errors: "localizer item 3 of condition N", "moseley.csv line 4"


@dataclass
class StimulusSet:
    name: str
    items: list[Item]
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    contrasts: dict[str, tuple[str, str]] = field(default_factory=dict)
    source: str = ""

    def matches(self, side: str) -> list[bool]:
        """Which items a contrast side selects: a group of the set, a conjunction `factor=level&factor=level`,
        or a bare level (`noun`) that names exactly one factor's level. Raises ValueError for a side that
        names nothing in the set, or a bare level that two factors share."""
        want = self.side_labels(side)
        return [all(item.labels.get(k) == v for k, v in want.items()) for item in self.items]

    def side_labels(self, side: str) -> dict[str, str]:
        side = side.strip()
        if side in self.groups:
            return self.groups[side]
        if "=" in side:
            return parse_labels(side.replace("&", ";"), f"the contrast side {side!r}")
        factors = sorted({k for item in self.items for k, v in item.labels.items() if v == side})
        if len(factors) > 1:
            raise ValueError(f"the contrast side {side!r} is a level of {', '.join(factors)} in {self.name}: "
                             f"write {factors[0]}={side}")
        if not factors:
            raise ValueError(f"the contrast side {side!r} is no group or label of the set {self.name} (groups: "
                             f"{', '.join(self.groups) or 'none'}; labels: {', '.join(self.label_names())})")
        return {factors[0]: side}

    def label_names(self) -> list[str]:
        return sorted({f"{k}={v}" for item in self.items for k, v in item.labels.items()})


def parse_labels(text: str, where: str) -> dict[str, str]:
    """`class=noun;concreteness=concrete` -> {'class': 'noun', 'concreteness': 'concrete'}; ValueError naming `where`."""
    labels = {}
    for part in text.split(";"):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not key or not value or not re.fullmatch(r"[\w.]+", key) or not re.fullmatch(r"[\w.]+", value):
            raise ValueError(f"{where}: labels must be factor=level pairs joined by ';' (letters, digits, _ and .), "
                             f"e.g. class=noun;concreteness=concrete; got {text!r}")
        if key in labels:
            raise ValueError(f"{where}: the factor {key!r} is given twice in {text!r}")
        labels[key] = value
    return labels


def parse_contrast(text: str, where: str) -> tuple[str, str]:
    """'S - N' -> ('S', 'N'); ValueError unless there is exactly one ' - ' (or '-') between two sides."""
    parts = text.split(" - ") if " - " in text else text.split("-")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"{where}: a contrast is two sides joined by '-', e.g. concrete_noun - concrete_verb or "
                         f"class=noun - class=verb; got {text!r}")
    return parts[0].strip(), parts[1].strip()


def contrast_name(a: str, b: str) -> str:
    """The name (units.npz keys, file names) of a contrast given as an expression: 'noun', 'verb' -> 'noun_vs_verb'."""
    return re.sub(r"\W+", "_", f"{a}_vs_{b}".replace("=", "_")).strip("_")


def _word_span(text: str, target: str, where: str) -> tuple[int, int]:
    found = re.search(rf"(?<!\w){re.escape(target)}(?!\w)", text)
    if not found:
        raise ValueError(f"{where}: the target {target!r} is not a word of the text {text!r}")
    return found.start(), found.end()


def _rows(path: Path, delimiter: str) -> tuple[list[str], list[str], list[tuple[int, dict]]]:
    """The '#' lines above the header, the header and (line number, row) of a delimited file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stimulus file not found: {path}")
    lines = read_text(path).splitlines()
    comments = []
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        comments.append(lines.pop(0))
    first = len(comments) + 1
    reader = csv.DictReader(io.StringIO("\n".join(lines) + "\n", newline=""), delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = list(reader.fieldnames or [])
    rows = [(first + reader.line_num - 1, row) for row in reader]
    return comments, header, rows


def _field(row: dict, column: str, path: Path, line: int) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise ValueError(f"{path} line {line}: the field '{column}' is empty or missing")
    return value.strip()


def _declarations(comments: list[str], path: Path) -> tuple[dict, dict]:
    groups, contrasts = {}, {}
    for line in comments:
        words = line.lstrip("#").strip()
        kind, _, rest = words.partition(" ")
        if kind not in ("group", "contrast"):
            continue
        name, eq, value = (x.strip() for x in rest.partition("="))
        if not eq or not re.fullmatch(r"\w+", name):
            raise ValueError(f"{path}: {line!r}: write '# {kind} NAME = ...' (NAME: letters, digits, _)")
        if kind == "group":
            groups[name] = parse_labels(value, f"{path}: group {name}")
        else:
            contrasts[name] = parse_contrast(value, f"{path}: contrast {name}")
    return groups, contrasts


def read_set(path: Path, name: str | None = None) -> StimulusSet:
    """This project's format (tab-separated; docs/analysis.md): columns text, labels, optional target, frame, item.

    A row with `frame` (a carrier frame holding `___`) is the frame with the text in the slot, read at the
    text; rows sharing a text and labels are one sample (averaged over frames). A row with `target` is
    read at the target's first whole-word occurrence, rows sharing a target and labels one sample.
    Otherwise every row is a sample. `item`: rows sharing it are matched (leave together). Groups and
    contrasts: `# group NAME = factor=level;...`, `# contrast NAME = SIDE - SIDE` above the header."""
    path = Path(path)
    comments, header, rows = _rows(path, "\t")
    unknown = [c for c in header if c not in SET_COLUMNS + SET_OPTIONAL]
    if any(c not in header for c in SET_COLUMNS) or unknown:
        raise ValueError(f"{path}: a stimulus set has the columns text and labels, optionally target, frame and item "
                         f"(tab-separated); got {header}")
    groups, contrasts = _declarations(comments, path)
    items = []
    for line, row in rows:
        text, labels = _field(row, "text", path, line), parse_labels(_field(row, "labels", path, line),
                                                                     f"{path} line {line}")
        key = ";".join(f"{k}={v}" for k, v in sorted(labels.items()))
        span, sample = None, f"row {line}"
        frame, target = (row.get("frame") or "").strip(), (row.get("target") or "").strip()
        if frame and target:
            raise ValueError(f"{path} line {line}: give a target or a frame, not both (a frame's target is the text)")
        if frame:
            if frame.count(FRAME_SLOT) != 1:
                raise ValueError(f"{path} line {line}: the frame {frame!r} needs one slot {FRAME_SLOT}")
            start = frame.index(FRAME_SLOT)
            span, sample, text = (start, start + len(text)), f"{text}|{key}", frame.replace(FRAME_SLOT, text)
        elif target:
            span, sample = _word_span(text, target, f"{path} line {line}"), f"{target}|{key}"
        match = (row.get("item") or "").strip() or sample
        items.append(Item(text, labels, span, sample, match, f"{path.name} line {line}"))
    if not items:
        raise ValueError(f"{path}: no items")
    return _checked(StimulusSet(name or path.stem, items, groups, contrasts, str(path)))


def _checked(stim: StimulusSet) -> StimulusSet:
    for name, (a, b) in stim.contrasts.items():
        for side in (a, b):
            try:
                stim.side_labels(side)
            except ValueError as e:
                raise ValueError(f"{stim.source}: contrast {name}: {e}") from None
    return stim


def as_localizer(stim: StimulusSet) -> StimulusSet:
    """A set read as the localizer: every item labelled condition=S, W, J or N (S and N at least), the same number of
    items in each, item k of every condition matched (by the `item` column, else by its order in the condition),
    items ordered by condition and item; the paper's contrasts of its conditions (LOCALIZER_CONTRASTS) added
    where the file does not declare them. Raises ValueError naming the set's file."""
    by_condition: dict[str, list[Item]] = {}
    for item in stim.items:
        condition = item.labels.get("condition")
        if condition not in LOCALIZER_CONDITIONS:
            raise ValueError(f"{stim.source}: {item.label}: a localizer item is labelled condition=S, W, J or N; got "
                             f"{item.labels}")
        by_condition.setdefault(condition, []).append(item)
    if not {"S", "N"} <= set(by_condition):
        raise ValueError(f"{stim.source}: a localizer needs the conditions S and N; got {', '.join(by_condition)}")
    numbered = all(it.match.isdigit() for it in stim.items)
    for items in by_condition.values():
        for k, item in enumerate(items):
            item.match = item.match if numbered else str(k)
        items.sort(key=lambda it: int(it.match))
    counts = {c: len(v) for c, v in by_condition.items()}
    keys = {c: [it.match for it in v] for c, v in by_condition.items()}
    if len(set(counts.values())) != 1 or len({tuple(v) for v in keys.values()}) != 1:
        raise ValueError(f"{stim.source}: every condition of a localizer needs the same items (item k of each is "
                         f"matched); got {counts} items per condition")
    contrasts = {n: sides for n, sides in LOCALIZER_CONTRASTS.items() if all(s in by_condition for s in sides)}
    items = [it for c in LOCALIZER_CONDITIONS for it in by_condition.get(c, [])]
    return _checked(StimulusSet(LOCALIZER, items, stim.groups, {**contrasts, **stim.contrasts}, stim.source))


def _localizer(items_by_condition: dict[str, list[str]], source: str, label) -> StimulusSet:
    """The localizer set from texts per condition: item k of every condition matched, every row one sample."""
    items = [Item(text, {"condition": c}, None, f"{c} {k}", str(k), label(c, k))
             for c, texts in items_by_condition.items() for k, text in enumerate(texts)]
    return as_localizer(StimulusSet(LOCALIZER, items, {}, {}, source))


def read_shipped_localizer(folder: Path) -> StimulusSet:
    """stimuli/localizer.tsv, a stimulus set (columns item, labels, text; labels condition=S/W/J/N), as the localizer,
    with the paper's six contrasts; items named 'localizer item <k> of condition <c>' in errors."""
    from topolm.stimuli import LOCALIZER_FILE

    stim = as_localizer(read_set(Path(folder) / LOCALIZER_FILE, LOCALIZER))
    for item in stim.items:
        item.label = f"localizer item {item.match} of condition {item.labels['condition']}"
    return stim


def read_shipped_pos(folder: Path) -> StimulusSet:
    """stimuli/pos.tsv, a stimulus set (columns labels, text, frame; labels class=noun / class=verb): every word one
    sample (its mean over the frames); the contrast verb_noun = verb - noun; rows named 'the noun <word> in its
    frame <j>' in errors. Raises ValueError for a row without a frame or a class."""
    from topolm.stimuli import POS_FILE

    stim = read_set(Path(folder) / POS_FILE, "pos")
    seen: dict[str, int] = {}
    for item in stim.items:
        if item.span is None or item.labels.get("class") not in ("noun", "verb"):
            raise ValueError(f"{stim.source}: {item.label}: every row of pos.tsv has a frame and class=noun or verb")
        word = item.text[item.span[0]:item.span[1]]
        seen[word] = seen.get(word, -1) + 1
        item.label = f"the {item.labels['class']} {word!r} in its frame {seen[word]}"
    return stim


def _require_columns(path: Path, header: list[str], columns: list[str], layout: str) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: the {layout} layout needs the columns {', '.join(columns)}; missing "
                         f"{', '.join(missing)} (got {header})")


def read_evlab(path: Path) -> StimulusSet:
    """The EvLab localizer CSV: columns stim1 .. stimN (the words of one item per row, N = 12 in the research
    code's files) and condition S or N; an item is its words joined by spaces. Item k of S is matched to item
    k of N. Raises ValueError for another condition or unequal counts."""
    path = Path(path)
    _, header, rows = _rows(path, ",")
    words = sorted((c for c in header if re.fullmatch(r"stim\d+", c)), key=lambda c: int(c[4:]))
    _require_columns(path, header, ["stim1", "condition"], "EvLab localizer")
    by_condition: dict[str, list[str]] = {}
    for line, row in rows:
        condition = _field(row, "condition", path, line)
        if condition not in ("S", "N"):
            raise ValueError(f"{path} line {line}: condition {condition!r}; the EvLab localizer has S and N")
        text = " ".join(row[c].strip() for c in words if row.get(c) and row[c].strip())
        by_condition.setdefault(condition, []).append(text or _field(row, "stim1", path, line))
    return _localizer(_equal(by_condition, path), str(path), lambda c, k: f"{path.name} item {k} of condition {c}")


def _equal(by_condition: dict[str, list[str]], path: Path) -> dict[str, list[str]]:
    counts = {c: len(v) for c, v in by_condition.items()}
    if len(set(counts.values())) != 1 or not by_condition:
        raise ValueError(f"{path}: every condition needs the same number of items (item k of each is matched); "
                         f"got {counts}")
    return {c: by_condition[c] for c in LOCALIZER_CONDITIONS if c in by_condition}


def read_fedorenko2010(path: Path) -> StimulusSet:
    """Fedorenko et al. (2010) experiment 2: columns ',sentence,condition' (an unnamed index first), condition
    S, W, J or N (160 each in the original); the k-th row of each condition is item k."""
    path = Path(path)
    _, header, rows = _rows(path, ",")
    _require_columns(path, header, ["sentence", "condition"], "Fedorenko 2010")
    by_condition: dict[str, list[str]] = {}
    for line, row in rows:
        condition = _field(row, "condition", path, line)
        if condition not in LOCALIZER_CONDITIONS:
            raise ValueError(f"{path} line {line}: condition {condition!r}; expected one of S, W, J, N")
        by_condition.setdefault(condition, []).append(_field(row, "sentence", path, line))
    return _localizer(_equal(by_condition, path), str(path), lambda c, k: f"{path.name} item {k} of condition {c}")


MOSELEY_CONTRASTS = {"concrete_noun_verb": ("concrete_noun", "concrete_verb"),
                     "abstract_noun_verb": ("abstract_noun", "abstract_verb"),
                     "abstract_concrete": ("abstract", "concrete"), "noun_verb": ("noun", "verb")}


def read_moseley(path: Path) -> StimulusSet:
    """Moseley & Pulvermueller (2014): columns word, category (concrete / abstract), class (noun / verb); each word
    one item, read on its own; labels concreteness=<category>;class=<class>, groups concrete_noun .. abstract_verb,
    the paper's four contrasts (MOSELEY_CONTRASTS)."""
    path = Path(path)
    _, header, rows = _rows(path, ",")
    _require_columns(path, header, ["word", "category", "class"], "Moseley & Pulvermueller")
    items = []
    for line, row in rows:
        word, category, cls = (_field(row, c, path, line) for c in ("word", "category", "class"))
        if category not in ("concrete", "abstract") or cls not in ("noun", "verb"):
            raise ValueError(f"{path} line {line}: category {category!r}, class {cls!r}; expected concrete or "
                             f"abstract, noun or verb")
        items.append(Item(word, {"concreteness": category, "class": cls}, None, f"row {line}", f"row {line}",
                          f"{path.name} line {line} ({word!r})"))
    groups = {f"{c}_{k}": {"concreteness": c, "class": k} for c in ("concrete", "abstract") for k in ("noun", "verb")}
    return _checked(StimulusSet("moseley", items, groups, dict(MOSELEY_CONTRASTS), str(path)))


ELLI_CATEGORIES = {"noun": ("bird", "mammal", "manmade", "natural"), "verb": ("hand", "light", "mouth", "sound")}


def read_elli(path: Path) -> StimulusSet:
    """Elli et al. (2019) / Hauptman et al. (2024): columns run, block, class (noun / verb), category (nouns: bird,
    mammal, manmade, natural; verbs: hand, light, mouth, sound) and pair (a two-word item, e.g. 'the garage the
    rink'), read whole; labels class=<class>;category=<category>; the contrast noun_verb = noun - verb."""
    path = Path(path)
    _, header, rows = _rows(path, ",")
    _require_columns(path, header, ["run", "block", "class", "category", "pair"], "Elli et al.")
    items = []
    for line, row in rows:
        cls, category, pair = (_field(row, c, path, line) for c in ("class", "category", "pair"))
        if category not in ELLI_CATEGORIES.get(cls, ()):
            raise ValueError(f"{path} line {line}: class {cls!r} with category {category!r}; expected a noun "
                             f"({', '.join(ELLI_CATEGORIES['noun'])}) or a verb ({', '.join(ELLI_CATEGORIES['verb'])})")
        items.append(Item(pair, {"class": cls, "category": category}, None, f"row {line}", f"row {line}",
                          f"{path.name} line {line} ({pair!r})"))
    return _checked(StimulusSet("elli", items, {}, {"noun_verb": ("noun", "verb")}, str(path)))


LAYOUTS = [  # (columns that identify the layout, reader)
    (("run", "block", "class", "category", "pair"), read_elli),
    (("word", "category", "class"), read_moseley),
    (("sentence", "condition"), read_fedorenko2010),
    (("stim1", "condition"), read_evlab),
]


def read_any(path: Path) -> StimulusSet:
    """One stimulus file in any layout this module reads, told apart by its header (tabs: this project's
    format or the shipped files; commas: the research layouts). Raises ValueError for a header no reader knows."""
    path = Path(path)
    _, header, _ = _rows(path, "\t")
    if len(header) == 1 and "," in header[0]:
        header = next(csv.reader([header[0]]))
    if "text" in header and "labels" in header:
        return read_set(path)
    for columns, reader in LAYOUTS:
        if all(c in header for c in columns):
            return reader(path)
    raise ValueError(f"{path}: no stimulus layout has the columns {header}: this project's set (text, labels, "
                     f"optional target, frame, item; tab-separated), or the research layouts (docs/analysis.md)")


def read_sets(spec: str, base: Path, shipped: Path) -> list[StimulusSet]:
    """The sets of analyze.py's `stimuli=`: comma-separated files or folders, relative to `base`; the name
    'stimuli' is the shipped folder `shipped`. A folder gives localizer.tsv, pos.tsv and every other *.tsv
    or *.csv in it. The localizer comes first: the shipped one unless a set given is a localizer (its name
    `localizer`). Raises ValueError / FileNotFoundError naming the entry; two sets of one name are refused."""
    from topolm.stimuli import LOCALIZER_FILE, POS_FILE

    sets: list[StimulusSet] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path = shipped if entry == "stimuli" else base / entry
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".tsv", ".csv") and p.is_file())
            if not files:
                raise FileNotFoundError(f"{path}: no stimulus files (*.tsv, *.csv) in this folder")
            named = {p.name: p for p in files}
            if LOCALIZER_FILE in named:
                sets.append(read_shipped_localizer(path))
            if POS_FILE in named:
                sets.append(read_shipped_pos(path))
            sets += [read_any(p) for p in files if p.name not in (LOCALIZER_FILE, POS_FILE)]
        elif path.exists():
            sets.append(read_any(path))
        else:
            raise FileNotFoundError(f"stimulus file or folder not found: {path}")
    sets = [as_localizer(s) if s.name == LOCALIZER else s for s in sets]
    names = [s.name for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two stimulus sets are named {', '.join(twice)}: give each set once (a set's name is its "
                         f"file's name)")
    if LOCALIZER not in names:
        sets.insert(0, read_shipped_localizer(shipped))
    return sorted(sets, key=lambda s: s.name != LOCALIZER)


@dataclass
class Contrast:
    """A contrast to run: its name, its set, its sides as written and as the conjunctions they select."""
    name: str
    set_name: str
    a: str
    b: str
    a_labels: dict[str, str] = field(default_factory=dict)
    b_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, s: StimulusSet, a: str, b: str) -> "Contrast":
        return cls(name, s.name, a, b, s.side_labels(a), s.side_labels(b))

    def selects(self, side: int, labels: dict[str, str]) -> bool:
        """Whether an item with `labels` is on side 0 (a) or 1 (b)."""
        return all(labels.get(k) == v for k, v in (self.a_labels if side == 0 else self.b_labels).items())

    @property
    def label(self) -> str:
        return f"{self.a} - {self.b}"


def select_contrasts(sets: list[StimulusSet], requested: str) -> list[Contrast]:
    """The contrasts of analyze.py's `contrasts=` (comma-separated): a contrast declared by a set (by name), an
    expression `SIDE-SIDE` (named by `contrast_name`; it must select items on both sides in exactly one
    set), 'all' (every declared contrast); empty: the headline ones (localizer, verb_noun) the sets declare.
    The localizer's S - N (`localizer`) always comes first. Raises ValueError naming the entry."""
    declared: dict[str, Contrast] = {}
    for s in sets:
        for name, (a, b) in s.contrasts.items():
            if name in declared:
                raise ValueError(f"the sets {declared[name].set_name} and {s.name} both declare a contrast {name}: "
                                 f"rename one (contrast names key units.npz and the figures)")
            declared[name] = Contrast.of(name, s, a, b)
    chosen = {"localizer": declared["localizer"]}
    entries = [e.strip() for e in requested.split(",") if e.strip()] or [n for n in HEADLINE if n in declared]
    for entry in entries:
        if entry == "all":
            chosen.update(declared)
        elif entry in declared:
            chosen[entry] = declared[entry]
        elif "-" in entry:
            a, b = parse_contrast(entry, f"contrasts={entry}")
            found = []
            for s in sets:
                try:
                    if any(s.matches(a)) and any(s.matches(b)):
                        found.append(s)
                except ValueError:
                    continue
            if len(found) != 1:
                where = f"in {len(found)} sets ({', '.join(s.name for s in found)})" if found else "in no set"
                raise ValueError(f"contrasts={entry}: its two sides select items {where}; a contrast compares the "
                                 f"items of one set (sets: {', '.join(s.name for s in sets)})")
            chosen[contrast_name(a, b)] = Contrast.of(contrast_name(a, b), found[0], a, b)
        else:
            raise ValueError(f"contrasts={entry}: no set declares this contrast (declared: {', '.join(declared)}); "
                             f"or give one as SIDE-SIDE, e.g. noun-verb")
    return list(chosen.values())
