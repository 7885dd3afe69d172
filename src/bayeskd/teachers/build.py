"""The teacher a config names: `teacher.backend` picks the client (imported only when used)."""

from __future__ import annotations

from bayeskd.teachers.config import TeacherConfig
from bayeskd.teachers.base import Teacher


def build_teacher(cfg: TeacherConfig) -> Teacher:
    if cfg.backend == "local":
        from bayeskd.teachers.local import LocalTeacher

        return LocalTeacher(cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, name=cfg.key_name)
    from bayeskd.teachers.openai_compat import OpenAITeacher

    teacher = OpenAITeacher(cfg)
    teacher.check()
    return teacher
