"""The reward the command line names (--reward, --reward-spec, --reward-path), for `train` and
`serve-reward` alike."""
from __future__ import annotations

def make_reward(args):
    """The reward --reward, --reward-spec and --reward-path name (`train` and `serve-reward`),
    its models on the trainer's --device (cuda:1 too, not the first GPU); one refused ends the
    command with one 'error: ...' line."""
    from ..rewards import create_reward
    from ..rewards.loading import default_device
    from ..rewards.remote import RewardServerError
    kwargs = {}
    if args.reward == "weighted":
        if not args.reward_spec:
            raise SystemExit("error: --reward weighted needs --reward-spec, e.g. 'pickscore:10, hpsv2:2'")
        kwargs["components"] = args.reward_spec
    if args.reward_path:
        kwargs["path"] = args.reward_path
    try:
        with default_device(getattr(args, "device", None)):    # serve-reward has no --device
            return create_reward(args.reward, **kwargs)
    except (ValueError, FileNotFoundError, TypeError, RewardServerError) as error:   # a URL: server down or refusing
        raise SystemExit(f"error: {error}") from None
