"""Sampling code shared by the trainer (student rollouts) and the teacher server (SeqKD's /v1/generate).

It imports only torch and transformers, so neither program imports the other: `teacher_server` and
`student_trainer` both import `generation`, as they both import `protocol`.
"""
