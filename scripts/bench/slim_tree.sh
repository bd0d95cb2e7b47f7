#!/usr/bin/env bash
# The device tool sends the checkout's tracked tree with every call, and tree + carried paths must stay under
# 64 MiB. Since the built-in v2 was installed (2026-12-04) the tracked tree alone is 74 MB: EVERY device call needs
# this script. This script checks out a throwaway branch `device-slim` = main without the files no GPU call needs
# (tests/reference: 19 MB; the installed built-in safetensors: 39 MB), or back to main afterwards. A training
# continuation of the installed model keeps its safetensors (`on tests/reference`: 55 MB) and carries the data
# (9 MB) alone; `dsv4/builtin_model/` is the init.
# Ignored folders (.init, .builtin_data) are untouched. Never merge device-slim.
# Usage (repository root): bash scripts/bench/slim_tree.sh on [PATH ...]   (then the device call)
#                          bash scripts/bench/slim_tree.sh off
# PATHs: what to leave out (default: tests/reference and the built-in safetensors); e.g. `on .init` for a call that
# needs the tests' reference files but not the committed training checkpoint parts.
set -eu
case "${1:-}" in
on)
    shift
    [ $# -gt 0 ] || set -- tests/reference 'dsv4/builtin_model/*.safetensors'
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        echo "commit or stash your changes first" >&2; exit 1
    fi
    base=$(git rev-parse --abbrev-ref HEAD)
    [ "$base" = device-slim ] && { echo "already on device-slim" >&2; exit 1; }
    echo "$base" > .git/slim_base
    git checkout -q -B device-slim
    git rm -rq --ignore-unmatch "$@"
    git commit -qm "device-slim: the tree without what GPU calls do not need (never merged)"
    echo "on device-slim (from $base): $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked";;
off)
    git checkout -q "$(cat .git/slim_base 2>/dev/null || echo main)"
    echo "back on $(git rev-parse --abbrev-ref HEAD)";;
*)
    echo "usage: slim_tree.sh on|off" >&2; exit 2;;
esac
