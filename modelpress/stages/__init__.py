"""The pipeline's steps as file-in/file-out functions (what Prefect tasks and DVC stages call).

- ``declare.py``: each stage's parameters, inputs and outputs, declared once; keys, skip-if-
  current and dvc.yaml come from there;
- ``layout.py``: where every artifact lives under ``run.workdir``; atomic JSON;
- ``records.py``: the typed records stages write (teacher info, summary);
- ``pipeline.py``: the stage functions, reaching methods only through their contract.
"""

from .declare import STAGES, dvc_yaml, is_current, stage_key
from .layout import StageError, paths, read_json, workdir, write_json
from .pipeline import (
    calibration_images,
    compress_stage,
    cycle_path,
    die_with_parent,
    evaluate_file,
    evaluate_in_fresh_process,
    fetch,
    file_content,
    finetune_stage,
    load_weights,
    method,
    method_config,
    method_step,
    pack_stage,
    preflight,
    read_teacher,
    resolve_weights,
    snapshot_path,
    stage_command,
    step_key,
    summarize,
    teacher,
    tokenizer_file,
    unless_skipped,
)
from .records import Summary, TeacherInfo

__all__ = [
    "STAGES", "StageError", "Summary", "TeacherInfo", "calibration_images", "compress_stage", "cycle_path", "die_with_parent", "evaluate_in_fresh_process",
    "dvc_yaml", "evaluate_file", "fetch", "file_content", "finetune_stage", "is_current", "load_weights", "method",
    "method_config", "method_step", "pack_stage", "paths", "preflight", "read_json", "read_teacher", "resolve_weights", "snapshot_path",
    "stage_command", "stage_key", "step_key", "summarize", "teacher", "tokenizer_file", "unless_skipped", "workdir", "write_json",
]
