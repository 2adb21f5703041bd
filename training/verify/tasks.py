"""The verifiable task suite that post-training trains and evaluates on: generated items, each with an exact checker,
split into a training and a held-out part that never share a prompt.

Tasks (each answer is checked exactly; none needs a model to grade it):
    sort       "Sort ascending: 7 2 9 4"            -> "2 4 7 9"
    add        "Add: 47 + 385"                      -> "432"
    reverse    "Reverse: k q a"                     -> "a q k"
    countdown  "Make 46 from 3 7 25 with + - *"     -> any expression over those numbers (each at most once) = 46
    code       "Write f(x) returning x * 3 + 1."    -> Python source, run against tests in the sandbox
The split is a hash of the task and prompt (10% held out), so any seed or count draws from the same two disjoint
pools, and an item is in the held-out part wherever it is generated. Drawing is deterministic per (seed, task, split).

A leaf for data, eval and rl: it imports only the sandbox (for the code task) and the standard library.
"""
from __future__ import annotations

import ast
import hashlib
import operator
import random
import string
from dataclasses import asdict, dataclass

TASKS = ("sort", "add", "reverse", "countdown", "code")
HELD_OUT_SHARE = 10   # percent of the prompt space held out for evaluation
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class TaskItem:
    task: str
    prompt: str
    answer: str          # a reference answer (countdown and code accept others that check)
    data: tuple = ()     # what the checker needs beyond the answer (countdown: numbers and target; code: tests)

    @property
    def id(self) -> str:
        return f"{self.task}-{hashlib.sha256(self.prompt.encode()).hexdigest()[:12]}"

    def conversation(self, reasoning: bool = False) -> dict:
        """The item as an SFT record (training/data/chat.py's format), with its task and id; `reasoning`: the reply
        is a reasoning turn, `worked_reasoning` as its `reasoning_content` (R1 §2.3.1's cold-start format)."""
        reply = {"role": "assistant", "content": self.answer}
        if reasoning:
            reply["reasoning_content"] = worked_reasoning(self)
        return {"messages": [{"role": "user", "content": self.prompt}, reply], "task": self.task, "id": self.id}

    def record(self) -> dict:
        return {**asdict(self), "data": list(self.data), "id": self.id}


def split_of(task: str, prompt: str) -> str:
    digest = hashlib.sha256(f"seekflow-tasks\0{task}\0{prompt}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_SHARE else "train"


# ------------------------------------------------------------------------------------------------- generators --
def _sort(rng: random.Random) -> TaskItem:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    return TaskItem("sort", f"Sort ascending: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits))))


def _add(rng: random.Random) -> TaskItem:
    a, b = rng.randrange(1, 1000), rng.randrange(1, 1000)
    return TaskItem("add", f"Add: {a} + {b}", str(a + b))


def _reverse(rng: random.Random) -> TaskItem:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))]
    return TaskItem("reverse", f"Reverse: {' '.join(letters)}", " ".join(reversed(letters)))


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _countdown(rng: random.Random) -> TaskItem:
    """Three numbers and a target reachable with two of + - * over them (the reference expression)."""
    numbers = [rng.randrange(1, 26) for _ in range(3)]
    a, b, c = rng.sample(numbers, 3)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    expression = f"({a} {op1} {b}) {op2} {c}"
    target = _OPS[op2](_OPS[op1](a, b), c)
    prompt = f"Make {target} from {' '.join(map(str, numbers))} with + - *"
    return TaskItem("countdown", prompt, expression, (tuple(numbers), target))


def _code(rng: random.Random) -> TaskItem:
    k, m = rng.randrange(2, 20), rng.randrange(0, 50)
    inputs = tuple(rng.sample(range(-20, 21), 4))
    tests = tuple((x, x * k + m) for x in inputs)
    return TaskItem("code", f"Write f(x) returning x * {k} + {m}.", f"def f(x):\n    return x * {k} + {m}", tests)


GENERATORS = {"sort": _sort, "add": _add, "reverse": _reverse, "countdown": _countdown, "code": _code}


def generate(task: str, split: str, count: int, seed: int = 0) -> list[TaskItem]:
    """`count` distinct items of `task` from `split` ("train" or "heldout"), the same for the same arguments."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"seekflow-tasks/{seed}/{task}/{split}")
    items: dict[str, TaskItem] = {}
    for _ in range(count * 200):   # the held-out pool is 10% of draws; duplicates are skipped
        candidate = GENERATORS[task](rng)
        if split_of(task, candidate.prompt) == split and candidate.prompt not in items:
            items[candidate.prompt] = candidate
            if len(items) == count:
                return list(items.values())
    raise ValueError(f"task {task}: only {len(items)} distinct {split} items exist within {count * 200} draws; "
                     f"ask for fewer than {count}")


def worked_reasoning(item: TaskItem) -> str:
    """A short worked solution of `item`, written by rule: the reasoning of a cold-start record. DeepSeek-R1's
    cold-start data (§2.3.1) is thousands of long chains of thought, gathered by prompting and human post-editing;
    the task suite's are one line, in a form the answer then restates (so a model must carry it over correctly)."""
    if item.task == "sort":
        return f"{len(item.answer.split())} digits, smallest first: {', '.join(item.answer.split())}"
    if item.task == "add":
        return f"{item.prompt.removeprefix('Add: ')} = {item.answer}"
    if item.task == "reverse":
        return f"last letter first: {', '.join(item.answer.split())}"
    if item.task == "countdown":
        return f"{item.answer} = {item.data[1]}"
    if item.task == "code":
        return f"f multiplies x, then adds: {item.answer.splitlines()[-1].strip()}"
    raise ValueError(f"no worked reasoning for task {item.task!r}")


# --------------------------------------------------------------------------------------------------- checkers --
def reply_text(completion: str) -> str:
    """The answer part of a completion: after a closing </think> if the model reasoned, whitespace trimmed."""
    return completion.rsplit("</think>", 1)[-1].strip()


def check(item: TaskItem, completion: str, sandbox_url: str | None = None) -> bool:
    """Whether `completion` answers `item` correctly (code runs in the sandbox: training/verify/sandbox.py)."""
    reply = reply_text(completion)
    if item.task == "countdown":
        return _check_countdown(reply, *item.data)
    if item.task == "code":
        return check_code_many([item], [completion], sandbox_url=sandbox_url)[0]
    return " ".join(reply.split()) == item.answer


def _check_countdown(expression: str, numbers: tuple[int, ...], target: int) -> bool:
    """An arithmetic expression of + - * over integer literals, each used at most as often as given, equal to
    target. Parsed with `ast`, never evaluated by Python: untrusted text stays data."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):
        return False
    used: list[int] = []

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)]
            return _OPS[symbol](value(node.left), value(node.right))
        raise ValueError("not allowed")

    try:
        result = value(tree.body)
    except ValueError:
        return False
    pool = list(numbers)
    for n in used:
        if n not in pool:
            return False
        pool.remove(n)
    return result == target


def code_program(item: TaskItem, completion: str) -> str:
    """The program the sandbox runs for a code item: the completion's source, then its tests."""
    source = reply_text(completion)
    if source.startswith("```"):
        source = source.strip("`").removeprefix("python").strip()
    checks = "\n".join(f"assert f({x}) == {y}, 'f({x})'" for x, y in item.data)
    return f"{source}\n\n{checks}\n"


def check_code_many(items: list[TaskItem], completions: list[str], sandbox_url: str | None = None) -> list[bool]:
    """Code items checked by execution, all in one batch of sandboxed programs (never in this process)."""
    from training.verify.sandbox import run_many
    from training.verify.spec import Limits

    programs = [code_program(item, completion) for item, completion in zip(items, completions, strict=True)]
    outcomes = run_many(programs, Limits(wall_s=5.0, cpu_s=5, memory_mb=512), sandbox_url=sandbox_url)
    return [outcome.status == "passed" for outcome in outcomes]
