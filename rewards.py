"""
Tasks whose answers a program checks: the prompts and rewards of reinforcement learning with
verifiable rewards (grpo.py, train.py --rl_task), and exact-match benchmarks (eval.py --tasks).

A task is a class with: name; alphabet (every character its prompts and answers use); stop (the text
that ends a completion); sample(generator, n) -> n (prompt, answer) pairs drawn for training, never
one of the held-out ones; val and test, fixed held-out lists of (prompt, answer); reward(completion,
answer) -> float, and well_formed(completion) -> bool for an optional format reward. Add one and
name it in TASKS.

Arithmetic: "37+485=" -> "522", the prompt beginning with the newline that ends the line before it in
the pretraining corpus (a problem at the very start of a context is one the model has rarely seen:
without it, greedy accuracy of an early arithmetic model fell from 13.1% to 5.2%). Each operand
has 1 to max_digits digits, the length drawn uniformly,
then the value among the numbers of that length (0-9 for one digit), so short sums are as common as
long ones. The held-out sets are drawn once from a fixed seed; no class of problems (lengths of the
two operands) gives more than a quarter of its problems to them, so training still sees every class.
"""
import random

import torch

HELD_OUT_SEED = 20231
TRAIN_SEED = 1337  # of the corpus prepare.py writes for pretraining


class Arithmetic:
    name = "arithmetic"
    alphabet = "\n+0123456789="
    stop = "\n"

    def __init__(self, max_digits=3, n_val=500, n_test=1000):
        self.max_digits = max_digits
        rng = random.Random(HELD_OUT_SEED)
        drawn, per_class = [], {}
        self.held_out = set()
        while len(drawn) < n_val + n_test:
            a, b = self.operands(rng.randrange)
            key = (len(str(a)), len(str(b)))
            if (a, b) in self.held_out or per_class.get(key, 0) >= self.class_size(*key) // 4:
                continue
            self.held_out.add((a, b))
            drawn.append(self.problem(a, b))
            per_class[key] = per_class.get(key, 0) + 1
        self.val, self.test = drawn[:n_val], drawn[n_val:]

    @staticmethod
    def class_size(la, lb):
        count = lambda n: 10 if n == 1 else 9 * 10 ** (n - 1)  # noqa: E731  (numbers of n digits)
        return count(la) * count(lb)

    def operands(self, below):
        """Two operands, each of a uniform length in 1..max_digits; below(n) draws from range(n)."""
        out = []
        for _ in range(2):
            n = 1 + below(self.max_digits)
            out.append(below(10) if n == 1 else 10 ** (n - 1) + below(9 * 10 ** (n - 1)))
        return out

    @staticmethod
    def problem(a, b):
        return f"\n{a}+{b}=", str(a + b)

    def sample(self, generator, n):
        """n training problems drawn with a torch.Generator (its state is the only state)."""
        below = lambda hi: int(torch.randint(hi, (1,), generator=generator))  # noqa: E731
        out = []
        while len(out) < n:
            a, b = self.operands(below)
            if (a, b) not in self.held_out:
                out.append(self.problem(a, b))
        return out

    @staticmethod
    def reward(completion, answer):
        """1 for the exact answer (what precedes the stop; spaces around it ignored), else 0."""
        return 1.0 if completion.strip() == answer else 0.0

    @staticmethod
    def well_formed(completion):
        return completion.strip().isdigit()


TASKS = {"arithmetic": Arithmetic}


def make_task(name):
    from common import UserError
    if name not in TASKS:
        raise UserError(f"unknown rl_task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()


def corpus(task, n, seed=TRAIN_SEED):
    """Text of n training problems with their answers, one a line, for pretraining a language model."""
    g = torch.Generator().manual_seed(seed)
    return "".join(p + a for p, a in task.sample(g, n)) + task.stop
