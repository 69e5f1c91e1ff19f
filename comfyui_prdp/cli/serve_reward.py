"""`python -m comfyui_prdp serve-reward --reward NAME`: the command that serves a reward model
over HTTP (the server itself: rewards/server.py)."""
from __future__ import annotations

import argparse
import sys

from ..rewards.server import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_IMAGES, DEFAULT_PORT, LOOPBACK, RewardServer

def add_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve-reward", help="serve a reward model over HTTP for --reward http://...",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--reward", required=True, help="reward name (see train --list-rewards) or 'weighted'")
    serve.add_argument("--reward-spec", default=None, help="for --reward weighted: e.g. 'pickscore:10, hpsv2:2'")
    serve.add_argument("--reward-path", default=None, help="weights file or folder of the reward model")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; anything but loopback lets others on the network use it "
                            "(there is no authentication)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: a free one, printed)")
    serve.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB, help="largest request body")
    serve.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="most images per request")
    return serve


def serve(args) -> int:
    """Run the server until Ctrl-C; refused settings print one 'error: ...' line (exit 2)."""
    from .reward import make_reward

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"error: --port {args.port}: use 0 to 65535")
    if args.max_body_mb < 1 or args.max_images < 1:
        raise SystemExit("error: --max-body-mb and --max-images must be at least 1")
    if args.reward.startswith(("http://", "https://")):
        raise SystemExit("error: --reward names the reward to serve (e.g. jpeg-compressibility), not a URL")
    reward = make_reward(args)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach it can use this reward (no "
              "authentication); use --host 127.0.0.1 to keep it on this machine", file=sys.stderr)
    server = RewardServer(reward, args.host, args.port, max_body_bytes=args.max_body_mb * 2 ** 20,
                          max_images=args.max_images)
    try:
        server.serve_forever(announce=lambda line: print(line, flush=True))
    except OSError as error:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port} ({error.strerror}); choose another "
                         "--port") from None
    return 0
