"""`python -m teacher_server --model DIR [--engine hf|vllm] ...` -> uvicorn serving the teacher.

Every flag can also come from a `TEACHER_<FLAG>` environment variable (flags win). The socket is bound only
after the model has loaded, so a client that can connect can be served.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from teacher_server.settings import Settings


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m teacher_server", description=__doc__.splitlines()[0])
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=field.description)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**args)
    except ValidationError as exc:
        parser.error("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    import uvicorn

    from teacher_server.app import create_app

    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=settings.graceful_shutdown_s, timeout_keep_alive=settings.keep_alive_s,
            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
        )
    )
    app.state.server = server
    server.run()
    if app.state.engine_failed:
        logging.getLogger("teacher_server").error("exiting with status 3: the engine failed")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
