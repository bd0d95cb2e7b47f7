"""Full-size DeepSeek-V4-Flash on 2 GPUs (issue 7); see dsv4/bench/full_flash.py and docs/parallel.md.

    torchrun --standalone --nproc-per-node 2 bench/full_flash.py --check --out bench/results/h200x2_full_flash.json
CPU smoke run of the same code: add `--config tiny --device cpu --context 32 --prefill 64 --decode-batches 1,2`.
"""

from dsv4.bench.full_flash import main

if __name__ == "__main__":
    main()
