"""Task definitions: GLM-130B's task YAML format, read unmodified (docs/glm130b.md §9.1).

    name: "LAMBADA"                    # required
    type: "gen"                        # mul | gen | lm (required)
    path: "lambada/lambada"            # data folder, relative to --data-path (else to the YAML's folder)
    file-pattern:                      # a glob, or {group: glob}; default "**/*.json*"
      test: "**/test.jsonl"
    use_task_mask: true                # [gMASK] instead of [MASK]
    sampling_strategy: "BeamSearchStrategy"
    num_beams: 16
    max_gen_length: 5

Keys may be spelled with ``-`` or ``_`` (GLM-130B's own files mix both, even inside one key:
``max_seq-length``). Keys GLM-130B ignores or that only tune its launcher are accepted and
ignored with a note. ``module`` names a GLM-130B Python class; glmctl maps the ones whose
protocol it implements (LAMBADA, Pile, MMLU) and otherwise runs the standard protocol of the
task's type, with a warning. glmctl adds two optional keys: ``protocol`` (``lambada``) and
``version`` (echoed into results.json ``versions``).

Every problem is raised as an InputError naming the YAML file and line.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from glmctl.errors import InputError, UsageError

TASK_TYPES = ("mul", "gen", "lm")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "tasks"
STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")
PROTOCOLS = ("standard", "lambada")

# module (GLM-130B Python class) -> glmctl protocol
KNOWN_MODULES = {
    "tasks.lambada.task.LAMBADA": "lambada",
    "tasks.language-modeling.pile.Pile": "standard",  # per-set BPB comes from meta.pile_set_name
    "tasks.mmlu.task.MMLU": "standard",               # MMLU only adds an overall group, which glmctl always reports
    "evaluation.MultiChoiceTask": "standard",
    "evaluation.GenerationTask": "standard",
    "evaluation.LanguageModelTask": "standard",
}

# key -> (type, default). Types: int, float, bool, str, list, pattern.
FIELDS: dict[str, tuple[str, object]] = {
    "name": ("str", None),
    "type": ("str", None),
    "path": ("str", None),
    "module": ("str", None),
    "metrics": ("list", None),
    "use_task_mask": ("bool", False),
    "use_multitask_encoding": ("bool", False),
    "unidirectional": ("bool", False),
    "max_seq_length": ("int", 2048),
    "file_pattern": ("pattern", "**/*.json*"),
    "micro_batch_size": ("int", 1),
    # gen
    "sampling_strategy": ("str", "BaseStrategy"),
    "num_beams": ("int", 4),
    "length_penalty": ("float", 1.0),
    "no_repeat_ngram_size": ("int", 3),
    "min_gen_length": ("int", 0),
    "max_gen_length": ("int", 128),
    # lm
    "generation_length": ("int", 256),
    # glmctl
    "protocol": ("str", None),
    "version": ("str", "1"),
}
# Keys found in GLM-130B's task files that change nothing here.
IGNORED = {"no_tokenized", "save_prediction", "prefix", "language", "task_type"}
DEFAULT_METRICS = {"mul": ["Accuracy"], "gen": ["EM", "F1"], "lm": ["PPL"]}


@dataclass
class TaskConfig:
    name: str
    type: str
    path: str
    source: Path                      # the YAML file
    data_dir: Path                    # resolved data folder
    module: str | None = None
    metrics: list = field(default_factory=list)
    use_task_mask: bool = False
    use_multitask_encoding: bool = False
    unidirectional: bool = False
    max_seq_length: int = 2048
    file_pattern: object = "**/*.json*"
    micro_batch_size: int = 1
    sampling_strategy: str = "BaseStrategy"
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128
    generation_length: int = 256
    protocol: str = "standard"
    version: str = "1"
    builtin: bool = False
    lines: dict = field(default_factory=dict)  # key -> line number in the YAML (for error messages)
    notes: list = field(default_factory=list)  # ignored keys, unsupported modules (warnings)

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else str(self.source)

    def to_dict(self) -> dict:
        """The resolved configuration (results.json ``configs``; the task hash covers it)."""
        keys = [k for k in FIELDS if k not in ("name",)]
        d = {"task": self.name, "glm130b": {k: getattr(self, k) for k in keys}}
        d["output_type"] = {"mul": "multiple_choice", "gen": "generate_until",
                            "lm": "loglikelihood_rolling"}[self.type]
        if self.protocol == "lambada":
            d["output_type"] = "generate_until+loglikelihood"
        d["metadata"] = {"version": self.version}
        return d

    def file_groups(self) -> dict[str, list[Path]]:
        """{group: sorted data files}. A plain pattern is one group named "all" (GLM-130B)."""
        if not self.data_dir.is_dir():
            raise InputError(f"{self.where('path')}: data folder {self.data_dir} does not exist")
        patterns = self.file_pattern if isinstance(self.file_pattern, dict) else {"all": self.file_pattern}
        groups = {}
        for group, pattern in patterns.items():
            files = sorted(Path(p) for p in _glob.glob(str(self.data_dir / pattern), recursive=True)
                           if Path(p).is_file())
            if files:
                groups[str(group)] = files
        if not groups:
            shown = pattern if not isinstance(self.file_pattern, dict) else ", ".join(self.file_pattern.values())
            raise InputError(f"{self.where('file_pattern')}: no data files in {self.data_dir} match {shown}")
        return groups

    def task_hash(self) -> str:
        """sha256 over the resolved config and every data file's relative path and content."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode())
        for group, files in self.file_groups().items():
            for f in files:
                h.update(f"{group}\0{f.relative_to(self.data_dir)}\0".encode())
                h.update(_file_sha256(f).encode())
        return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _normalise_key(key) -> str:
    return str(key).strip().lower().replace("-", "_")


def _read_yaml(path: Path) -> tuple[dict, dict]:
    """(mapping, {key: line}) of a YAML file, with 1-based line numbers for error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or node is None or not hasattr(node, "value"):
        raise InputError(f"{path}:1: a task file must be a mapping of keys to values")
    lines = {}
    for k, _v in node.value:
        lines[_normalise_key(k.value)] = k.start_mark.line + 1
    return data, lines


def _coerce(kind: str, value, where: str, key: str):
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise InputError(f"{where}: {key} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{where}: {key} must be an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{where}: {key} must be a number, got {value!r}")
    if kind == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"{where}: {key} must be a string, got {value!r}")
    if kind == "list":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise InputError(f"{where}: {key} must be a list of names, got {value!r}")
    if kind == "pattern":
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise InputError(f"{where}: {key} must be a glob or a mapping of group names to globs, got {value!r}")
    raise AssertionError(kind)


def load_task(path: str | Path, data_path: str | Path | None = None, builtin: bool = False) -> TaskConfig:
    """Read one task YAML. ``path`` in the YAML is relative to ``data_path`` when given (GLM-130B's
    --data-path), else to the YAML's own folder; built-in tasks always use their own folder."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    values, notes = {}, []
    for key, value in raw.items():
        k = _normalise_key(key)
        where = f"{path}:{lines.get(k, 1)}"
        if k in IGNORED:
            continue
        if k not in FIELDS:
            notes.append(f"{where}: unknown key {key!r} ignored")
            continue
        if value is None:
            continue
        values[k] = _coerce(FIELDS[k][0], value, where, k)
    for req in ("name", "type", "path"):
        if req not in values:
            raise InputError(f"{path}:1: missing required key {req!r}")
    where = lambda k: f"{path}:{lines.get(k, 1)}"  # noqa: E731
    ttype = values["type"]
    if ttype not in TASK_TYPES:
        extra = " ('other' needs a custom GLM-130B module, which glmctl cannot run)" if ttype == "other" else ""
        raise InputError(f"{where('type')}: unknown task type {ttype!r} (expected mul, gen or lm){extra}")
    protocol = values.pop("protocol", None)
    module = values.get("module")
    if protocol is None:
        protocol = "standard"
        if module is not None:
            if module in KNOWN_MODULES:
                protocol = KNOWN_MODULES[module]
            else:
                notes.append(f"{where('module')}: module {module} is not available in glmctl; "
                             f"running the standard {ttype} protocol")
    if protocol not in PROTOCOLS:
        raise InputError(f"{where('protocol')}: unknown protocol {protocol!r} (expected {', '.join(PROTOCOLS)})")
    if protocol == "lambada" and ttype != "gen":
        raise InputError(f"{where('type')}: the lambada protocol needs type gen, got {ttype!r}")
    if values.get("unidirectional") and not values.get("use_task_mask"):
        raise InputError(f"{where('unidirectional')}: unidirectional needs use_task_mask: true "
                         "([MASK] does not support unidirectional attention)")
    if values.get("sampling_strategy", "BaseStrategy") not in STRATEGIES:
        raise InputError(f"{where('sampling_strategy')}: unknown sampling_strategy "
                         f"{values['sampling_strategy']!r} (expected {' or '.join(STRATEGIES)})")
    for k in ("max_seq_length", "num_beams", "max_gen_length", "generation_length", "micro_batch_size"):
        if k in values and values[k] < 1:
            raise InputError(f"{where(k)}: {k} must be at least 1, got {values[k]}")
    if data_path is not None and not builtin:
        data_dir = Path(data_path) / values["path"]
    else:
        data_dir = path.parent / values["path"]
    values.setdefault("metrics", list(DEFAULT_METRICS[ttype]))
    return TaskConfig(source=path, data_dir=data_dir, protocol=protocol, builtin=builtin, lines=lines,
                      notes=notes, **values)


# ---- finding tasks -------------------------------------------------------------------------
def builtin_tasks() -> dict[str, Path]:
    """{name: yaml} of the tasks that ship with glmctl (glmctl/tasks/*.yaml)."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


@dataclass
class TaskSpec:
    """One YAML to run: its path, and whether it is built in."""
    yaml: Path
    builtin: bool = False


def find_tasks(names: list[str]) -> list[TaskSpec]:
    """Resolve TASK arguments: a YAML file, a folder (searched recursively), a built-in task name,
    or ``builtin`` for all built-in tasks. Order is kept; duplicates are dropped."""
    out: list[TaskSpec] = []
    seen = set()
    builtins = builtin_tasks()
    for name in names:
        p = Path(name)
        if p.is_file():
            specs = [TaskSpec(p)]
        elif p.is_dir():
            specs = [TaskSpec(f) for f in sorted(list(p.rglob("*.yaml")) + list(p.rglob("*.yml")))]
            if not specs:
                raise UsageError(f"{p}: folder contains no task YAML files")
        elif name in builtins:
            specs = [TaskSpec(builtins[name], builtin=True)]
        elif name == "builtin":
            specs = [TaskSpec(y, builtin=True) for y in builtins.values()]
        else:
            raise UsageError(f"unknown task {name!r}: not a YAML file, a folder, or a built-in task "
                             f"({', '.join(list(builtins) + ['builtin'])})")
        for s in specs:
            key = s.yaml.resolve()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out
