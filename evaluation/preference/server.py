"""The rating page and its small JSON API, on Starlette (the toolkit FastAPI is built on: five routes need no more)
served by uvicorn.

    GET  /                      the page (page.html beside this file)
    GET  /api/study             the questions the page asks
    GET  /api/next?rater=NAME   the pair to rate: its token, the prompt and the two video addresses, no model name
    POST /api/vote              {token, rater, choice: left|right|tie|skip, answers: {question: left|right|tie}}
    GET  /video/TOKEN/left      the video on one side of a shown pair (ranges served, so it seeks and loops)

No address names a file: a video is reached through the token of a pair shown, which the database maps to a file
of the study's folders, so nothing a browser sends reads outside them or writes outside the database.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from errors import InputError
from evaluation.preference.store import Store, VoteRefused
from evaluation.preference.study import OVERALL, QUESTIONS

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 16_384  # a vote is a few hundred bytes


def build_app(store: Store) -> Starlette:
    page = PAGE.read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def study(request: Request) -> Response:
        qs = [{"key": q, "text": QUESTIONS[q]} for q in store.study.questions]
        return JSONResponse({"overall": OVERALL, "questions": qs, "comparisons": len(store.study.comparisons)})

    async def next_pair(request: Request) -> Response:
        rater = request.query_params.get("rater", "")
        try:
            pair = store.next_pair(rater)
            progress = store.progress(rater.strip())
        except VoteRefused as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if pair is None:
            return JSONResponse({"done": True, "progress": progress})
        t = pair["token"]
        return JSONResponse({"done": False, "token": t, "prompt": pair["prompt"], "left": f"/video/{t}/left",
                             "right": f"/video/{t}/right", "progress": progress},
                            headers={"cache-control": "no-store"})

    async def vote(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "a vote is a small JSON object"}, status_code=413)
        try:
            v = json.loads(body)
            if not isinstance(v, dict) or not isinstance(v.get("answers", {}), dict):
                raise VoteRefused("a vote is {token, rater, choice, answers}")
            progress = store.vote(str(v.get("token", "")), str(v.get("rater", "")), str(v.get("choice", "")),
                                  v.get("answers") or {})
        except (ValueError, VoteRefused) as e:
            return JSONResponse({"error": str(e) if isinstance(e, VoteRefused) else "a vote is JSON"},
                                status_code=400)
        return JSONResponse({"ok": True, "progress": progress})

    async def video(request: Request) -> Response:
        path = store.video(request.path_params["token"], request.path_params["side"])
        if path is None:
            return Response("no such video", status_code=404)
        return FileResponse(path, media_type="video/mp4", headers={"cache-control": "no-store"})

    return Starlette(routes=[
        Route("/", index), Route("/api/study", study), Route("/api/next", next_pair),
        Route("/api/vote", vote, methods=["POST"]), Route("/video/{token}/{side}", video),
    ])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use: pass another --port (0 picks a free one)") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --host or --port") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve(store: Store, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(build_app(store), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
