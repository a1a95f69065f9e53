"""The language-model benchmarks' learning-rate schedule (lm_worker.py, transformer_worker.py;
convergence.py checks it before it starts any run): a linear warm-up to ``--lr`` over
``--lr-warmup`` of the steps, a cosine decay to ``--min-lr`` x ``--lr`` that ends at
``--decay-until`` of the steps, then that final rate to the last step. A flat tail (e.g.
``--decay-until 0.8``) is what the plateau check needs: with the decay stretched to the run,
its last 20% is always the end of the anneal, where the loss falls because the rate does."""

import math

# each worker's defaults: the char-LM's SGD keeps --lr constant, the transformer's AdamW warms
# up over 5% of the steps and decays to a tenth at the last one
CHAR_LM = dict(warmup=0.0, floor=1.0)
TRANSFORMER = dict(warmup=0.05, floor=0.1)


def add_schedule_arguments(parser, warmup, floor):
    parser.add_argument("--lr-warmup", type=float, default=warmup,
                        help="fraction of the steps of linear warm-up to --lr")
    parser.add_argument("--min-lr", type=float, default=floor,
                        help="the cosine decay ends at this fraction of --lr (1: no decay)")
    parser.add_argument("--decay-until", type=float, default=1.0,
                        help="fraction of the steps at which the cosine decay ends; the steps "
                        "after it keep --min-lr (a flat tail, where a plateau shows)")


def schedule_error(lr_warmup, min_lr, decay_until):
    """What is wrong with these settings (naming the option), or None."""
    if not 0 <= lr_warmup < 1:
        return f"--lr-warmup must be in [0, 1), got {lr_warmup}"
    if not 0 <= min_lr <= 1:
        return f"--min-lr must be in [0, 1], got {min_lr}"
    if not lr_warmup < decay_until <= 1:
        return (f"--decay-until must be in (--lr-warmup, 1] = ({lr_warmup}, 1], "
                f"got {decay_until}")
    if decay_until < 1 and min_lr == 1:
        return ("--decay-until ends a decay, and with --min-lr 1 there is none: give "
                "--min-lr below 1")
    return None


def check_schedule(parser, args):
    error = schedule_error(args.lr_warmup, args.min_lr, args.decay_until)
    if error:
        parser.error(error)


def learning_rate(step, args):
    """The rate of ``step`` (counting from 1) of ``args.steps``: see the module docstring."""
    warmup = max(1, round(args.lr_warmup * args.steps))
    if step <= warmup:
        return args.lr * step / warmup
    end = max(warmup + 1, round(args.decay_until * args.steps))
    progress = min(1.0, (step - warmup) / (end - warmup))
    return args.lr * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
