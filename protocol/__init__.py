"""The wire contract between the student trainer and the teacher server.

Both programs import this package and nothing else of each other: the request/response schema
(`schema`), the binary and JSON encodings (`codec`) and the tokenizer fingerprint (`fingerprint`).
"""

from protocol.schema import PROTOCOL_VERSION, ErrorEnvelope, ScoreBatch, ScoreResult

__all__ = ["PROTOCOL_VERSION", "ErrorEnvelope", "ScoreBatch", "ScoreResult"]
