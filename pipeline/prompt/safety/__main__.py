"""`python -m pipeline.prompt.safety`: check texts against a prompt policy from the shell, or print the
shipped default policy as YAML (`--dump`) to start a policy file from. Exit 0: allowed (or dumped),
1: blocked, 2: the policy cannot be used."""

from __future__ import annotations

import argparse
import sys

import yaml

from pipeline.prompt.safety.policy import DEFAULT_POLICY, PolicyError, blocked_reason, load_policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.prompt.safety",
                                 description="Check texts against a prompt policy, or print the default policy.")
    ap.add_argument("--policy", default=None, help="policy path/URI, 'default' (the default) or 'none'")
    ap.add_argument("--dump", action="store_true", help="print the shipped default policy as YAML and exit")
    ap.add_argument("texts", nargs="*", help="texts checked together (e.g. a prompt and its caption)")
    args = ap.parse_args(argv)
    if args.dump:
        sys.stdout.write(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False, allow_unicode=True, width=100))
        return 0
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = policy.check(*args.texts)
    if verdict is None:
        print("allowed")
        return 0
    print(f"{blocked_reason(verdict)} (term: {verdict.term}; matched: {verdict.matched})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
