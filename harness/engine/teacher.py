"""Teachers: given as a checkpoint, found in the cache, or trained on first use.

The cache lives in `<paths.cache>/teachers/<key>/` with `teacher.pt` (a state dict) and
`meta.json` (provenance: checkpoint sha256, val mIoU re-measured by our evaluator on the whole val
split, the run that trained it). The key hashes the teacher's model and training settings, the
dataset, the teacher's budget and ``training_code_digest()`` (the bytes of the source files that
decide how a teacher trains: the loop, the run setup, the models, the data, the config defaults),
so changing any of them, code included, trains a new teacher, and changing the student's
hyperparameters never does. A stale teacher from older training code is never reused silently. A file lock makes concurrent trials wait for one training
instead of each training its own.

Every teacher handed to a method is frozen: eval mode, requires_grad False, called under no-grad.
Checkpoints are loaded with `weights_only=True`. A missing teacher is trained by
`harness.engine.train.run` (the one training path) and its record stored like any run's.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from harness.config import TEACHER_THREADS, stable_hash
from harness.errors import ConfigError
from harness.data import build_dataset
from harness.engine.evaluate import evaluate, slide_window
from harness.engine.record import store_record
from harness.engine.train import resolve_device, run
from harness.models import Segmenter, build_segmenter
from harness.models.convert import CheckpointLayoutError, convert_state_dict

MODEL_KEYS = ("name", "backbone", "head", "output_stride", "head_channels", "width", "aux", "aux_weight",
              "dropout", "pretrained")
BUDGET_KEYS = ("name", "teacher_iterations", "teacher_batch_size", "crop_size", "scale_range", "flip")


class TeacherError(ConfigError):
    """A teacher checkpoint that cannot be used (missing, corrupt, or for another model/dataset)."""


# The source that decides what a trained teacher is (relative to the harness package): the training
# loop and run setup, the evaluator that measures it, every model and dataset module, and the config
# defaults. Methods are left out: a teacher trains student-only.
TRAINING_CODE = ("engine/loop.py", "engine/train.py", "engine/evaluate.py", "engine/teacher.py", "config.py",
                 "params.py", "models/", "data/")


def training_code_digest() -> str:
    """sha256 (16 hex) over the files of TRAINING_CODE, in path order, line endings normalised."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for entry in TRAINING_CODE:
        path = root / entry
        files += sorted(path.rglob("*.py")) if entry.endswith("/") else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:16]


def teacher_key(cfg: dict) -> str:
    t = cfg["teacher"]
    return stable_hash({"teacher": {k: t[k] for k in MODEL_KEYS}, "train": t["train"],
                        "dataset": cfg["dataset"], "budget": {k: cfg["budget"][k] for k in BUDGET_KEYS},
                        "code": training_code_digest()})


def teacher_dir(cfg: dict) -> Path:
    return Path(cfg["paths"]["cache"]) / "teachers" / f"{cfg['teacher']['name']}-{teacher_key(cfg)}"


class Teacher(NamedTuple):
    model: Segmenter   # frozen, on the run's device
    info: Dict         # provenance: source, checkpoint, sha256, val mIoU re-measured


def teacher_for(cfg: dict, command: str = "") -> Optional[Teacher]:
    """The teacher a run of `cfg` distils from (None for a student-only run), on the run's device."""
    if not cfg["method"]:
        return None
    return get_teacher(cfg, resolve_device(cfg["device"]), command)


def get_teacher(cfg: dict, device: torch.device, command: str = "") -> Teacher:
    """The frozen teacher for `cfg` and its provenance record."""
    if cfg["teacher"]["checkpoint"]:
        path = Path(cfg["teacher"]["checkpoint"])
        model = load_checkpoint(cfg, path)
        info = _measured(cfg, path, model)
    else:
        model, info = cached_or_trained(cfg, command)
    return Teacher(freeze(model.to(device)), info)


def check_teacher(cfg: dict) -> None:
    """Raise TeacherError (exit 2) now for a teacher that `teacher_for` would refuse later: a given
    `teacher.checkpoint` that is missing, corrupt or for another model, or a cached teacher whose
    meta.json cannot be read or whose checkpoint does not match its hash. Reads only, takes no lock and
    trains nothing (a teacher missing from the cache is fine: it is trained when first needed), so a
    command can call it before it creates anything (the sweep: before its results database)."""
    if not cfg["method"]:
        return
    if cfg["teacher"]["checkpoint"]:
        load_checkpoint(cfg, Path(cfg["teacher"]["checkpoint"]))
        return
    folder = teacher_dir(cfg)
    ckpt, meta_path = folder / "teacher.pt", folder / "meta.json"
    if ckpt.is_file() and meta_path.is_file():
        _cached_meta(folder, ckpt, meta_path)


def _cached_meta(folder: Path, ckpt: Path, meta_path: Path) -> Dict:
    """The cached teacher's meta.json, checked against its checkpoint's sha256 (TeacherError if not)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:
        raise TeacherError(f"the cached teacher's {meta_path} cannot be read ({type(e).__name__}); "
                           f"delete {folder} to retrain it") from None
    if not isinstance(meta, dict) or meta.get("sha256") != sha256_of(ckpt):
        raise TeacherError(f"the cached teacher {ckpt} does not match the hash in its meta.json "
                           f"(corrupt or edited); delete {folder} to retrain it")
    return meta


def cached_or_trained(cfg: dict, command: str = "") -> Tuple[Segmenter, Dict]:
    folder = teacher_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        ckpt, meta_path = folder / "teacher.pt", folder / "meta.json"
        if ckpt.is_file() and meta_path.is_file():
            meta = _cached_meta(folder, ckpt, meta_path)
            return load_checkpoint(cfg, ckpt), meta
        print(f"[harness] no cached teacher '{cfg['teacher']['name']}' for this dataset and budget "
              f"(key {teacher_key(cfg)}): training it first "
              f"({cfg['budget']['teacher_iterations']} iterations).", file=sys.stderr, flush=True)
        return train_teacher(cfg, folder, command)


def train_teacher(cfg: dict, folder: Path, command: str = "") -> Tuple[Segmenter, Dict]:
    tcfg = teacher_training_config(cfg)
    result = run(tcfg, command=command or "teacher", label="teacher")
    record = result.record.replace(arm="teacher", extra_json={**result.record.extra_json,
                                                              "teacher_key": teacher_key(cfg)})
    store_record(tcfg, record)
    if record.status != "completed":
        raise RuntimeError(f"training the teacher failed: {record.failure_reason}")
    ckpt = folder / "teacher.pt"
    tmp = folder / f".teacher.{os.getpid()}.tmp"
    buffer = io.BytesIO()  # saved through a buffer: the archive's inner folder is then always "archive",
    torch.save(result.model.state_dict(), buffer)  # not the temporary file's name, so the same training
    tmp.write_bytes(buffer.getvalue())              # gives the same bytes and the same sha256
    os.replace(tmp, ckpt)
    model = load_checkpoint(cfg, ckpt)
    metrics = measure(cfg, model)
    meta = {"source": "trained", "key": teacher_key(cfg), "training_code": training_code_digest(),
            "name": cfg["teacher"]["name"],
            "checkpoint": str(ckpt), "sha256": sha256_of(ckpt), "val_miou": metrics["miou"],
            "val_per_class_iou": metrics["per_class_iou"], "val_images": metrics["images"],
            "trained_by_run": record.run_id, "iterations": record.iterations,
            "train_time_s": record.train_time_s, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = folder / f".meta.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "meta.json")
    print(f"[harness] teacher trained: val mIoU {100 * metrics['miou']:.2f} (re-measured), "
          f"cached in {folder}", file=sys.stderr, flush=True)
    return model, meta


def teacher_training_config(cfg: dict) -> dict:
    """The run that trains the teacher: the teacher model as the 'student', its own optimiser."""
    t, b = cfg["teacher"], cfg["budget"]
    tcfg = copy.deepcopy(cfg)
    tcfg["student"] = {k: t[k] for k in MODEL_KEYS}
    tcfg["method"] = {}
    tcfg["optim"] = {"name": "sgd", "lr": t["train"]["lr"], "momentum": t["train"]["momentum"],
                     "weight_decay": t["train"]["weight_decay"], "nesterov": False, "poly_power": 0.9,
                     "grad_clip_norm": None}
    tcfg["budget"] = {**b, "iterations": b["teacher_iterations"], "batch_size": b["teacher_batch_size"],
                      "eval_interval": max(1, b["teacher_iterations"] // 4)}
    tcfg["seed"] = t["train"]["seed"]
    tcfg["threads"] = t["train"].get("threads", TEACHER_THREADS)  # never the caller's: the weights depend on it
    tcfg["train_split"], tcfg["eval_split"] = "train", "val"
    return tcfg


def load_checkpoint(cfg: dict, path: Path) -> Segmenter:
    """Build the configured teacher and load `path` into it, with errors a user can act on."""
    num_classes = cfg["dataset"]["num_classes"]
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint {path} does not exist (teacher.checkpoint); give the "
                           f"path of a state dict saved with torch.save(model.state_dict(), path), or set "
                           f"teacher.checkpoint=null to train the teacher")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise TeacherError(f"teacher checkpoint {path} cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); it is corrupt or not a torch state dict. It is read "
                           f"with weights_only=True: a file that also pickles training state (mmengine's "
                           f"message_hub, argparse args) must be re-saved as its state dict alone, e.g. "
                           f"torch.save(torch.load(f, weights_only=False)['state_dict'], out) where you trust f") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"teacher checkpoint {path} is not a state dict (a dict of tensors)")
    model = build_segmenter({k: cfg["teacher"][k] for k in MODEL_KEYS}, num_classes)
    try:  # checkpoints of torchvision, mmsegmentation and CIRKD are renamed to our keys (models/convert.py)
        state, _ = convert_state_dict(state, model.state_dict(), cfg["teacher"].get("checkpoint_format") or "auto")
    except CheckpointLayoutError as e:
        raise TeacherError(f"teacher checkpoint {path} does not fit teacher '{cfg['teacher']['name']}' "
                           f"with {num_classes} classes (dataset '{cfg['dataset']['name']}'): {e}") from None
    model.load_state_dict(state)
    return model


def measure(cfg: dict, model: Segmenter) -> Dict:
    """The teacher's mIoU on the whole val split, by the same evaluator as every student."""
    cache_dir = str(Path(cfg["paths"]["cache"]) / "data")
    val = build_dataset(cfg["dataset"], "val", cache_dir=cache_dir)
    loader = DataLoader(val, batch_size=cfg["budget"]["eval_batch_size"], shuffle=False)
    device = next(model.parameters()).device
    return evaluate(model, loader, val.num_classes, val.ignore_index, device, class_names=val.class_names,
                    slide=slide_window(cfg["dataset"]))


def _measured(cfg: dict, path: Path, model: Segmenter) -> Dict:
    """Provenance of a user-given checkpoint; its val mIoU is measured once per (file, dataset)."""
    digest = sha256_of(path)
    record = Path(cfg["paths"]["cache"]) / "teachers" / "measured" / f"{digest[:16]}-{stable_hash(cfg['dataset'])}.json"
    if record.is_file():
        return json.loads(record.read_text())
    metrics = measure(cfg, model)
    info = {"source": "checkpoint", "checkpoint": str(path), "sha256": digest, "name": cfg["teacher"]["name"],
            "val_miou": metrics["miou"], "val_per_class_iou": metrics["per_class_iou"],
            "val_images": metrics["images"]}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, record)
    return info


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
