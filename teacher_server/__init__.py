"""Teacher scoring service: `python -m teacher_server --model DIR` serves `POST /v1/score` over HTTP."""
