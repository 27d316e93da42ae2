"""Every `error:` the product can print for a user's mistake says what is wrong and how to fix it, in one message.

The catalogue is read from the source by AST: the message of every user error (main.py's EXIT_CODES classes and
their subclasses, and a parameter annotated type[ConfigError]), every SystemExit("error: ...") and
print("error: ...", file=sys.stderr), parser.error(...), config_file.fail(...) and load's bad(...), and the
message functions given to errors.storage_failures. A message's text is its literal parts, with names, f-string
placeholders and helper functions' returns resolved where they are literal text too (FOLDER_FIX,
renamed_key_message, ...); what stays unknown is "{…}". Each text must state a fix (FIX): an imperative such as
"set", "give", "run", "leave out" opening a clause, after the problem and a separator. Messages with no literal text
of their own (they pass on another error's message) are listed in PASSED_ON, each with its reason.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("qkv_vit", "launch", "configs")
MIN_MESSAGES = 150  # the catalogue held about 170 when this test was written: a walk that finds few is broken
MAX_VARIANTS = 64  # resolved placeholders multiply a message's texts; past this they stay "{…}"
UNKNOWN = "{…}"

FIX_WORDS = (
    "add|change|check|choose|convert|correct|delete|download|evaluate|export|fix|free|give|increase|install|keep|"
    "leave|lower|make|move|pack|pass|pick|point|prepare|put|raise|reduce|remove|rename|replace|rerun|run|set|start|"
    "try|unset|use|wait|write"
)
# A fix opens a clause: at the start of the message, or after the problem and ":", ";", ".", ",", "(" or a dash, or
# as a capitalized sentence after a passed-on message ("{error} Choose ..."); "then" may come first; `see` counts
# only for a page or a flag that says more.
OPENINGS = r"(?:^|[:;.,—]\s+|\(\s*|\s[-–]\s|\}\s+(?-i:(?=[A-Z])))(?:then\s+)?"
FIX = re.compile(rf"{OPENINGS}(?:(?:{FIX_WORDS})\b|pip install\b|see (?:docs/|--|README))", re.I)

# Messages with no literal text of their own, or only a prefix before another error's message: (file, the
# message's source) -> why the fix is not theirs to state.
PASSED_ON = {
    ("qkv_vit/config_file.py", "f'error: {one_line(message)}'"): "fail() prints its callers' messages, each checked",
    ("qkv_vit/config_file.py", "str(error)"): "a ConfigError's message, checked where it is raised",
    ("qkv_vit/config_file.py", "f'--config={argument}: {problem}'"): "bad() adds the flag to its callers' messages",
    ("qkv_vit/main.py", "str(error)"): "a user error's message, checked where it is raised",
    ("qkv_vit/plan/__main__.py", "str(error)"): "a ConfigError's message, checked where it is raised",
    ("qkv_vit/evaluate/__main__.py", "str(error)"): "a ConfigError's message (or weights.py's), checked where raised",
    ("qkv_vit/errors.py", "message(cause, error)"): "the callers' message functions, each checked",
    ("qkv_vit/analysis/__main__.py", "f'error: {error}'"): "read_weights' and analyze_codes' messages",
    ("qkv_vit/params.py", "f'error: {error}'"): "the model options' ValueError messages",
    ("qkv_vit/results.py", "f'error: {error}'"): "find_runs' FileNotFoundError message (or a broken JSON's)",
    ("qkv_vit/data/inspect.py", "f'error: {error}'"): "a DataConfigError's message, checked where it is raised",
    ("launch/sweep.py", "f'error: {error}'"): "the config file's ConfigError (get_sweep), checked where it is raised",
    ("qkv_vit/sweep.py", "f'error: {error}'"): "the config file's ConfigError (get_sweep), checked where it is raised",
    ("qkv_vit/convert/__main__.py", "f'error: {one_line(str(error))}'"): "the conversion's messages",
    ("qkv_vit/export/__main__.py", "f'error: {one_line(str(error))}'"): "the export's messages",
    ("qkv_vit/convert/loading.py", "f'{error}\\n  The file holds XCiT({format_kwargs(file_architecture)}).'"): (
        "adds the file's architecture to check_match's message"
    ),
    (
        "qkv_vit/convert/regnet.py",
        "f'{error}\\n  The model is {model.config_name} with {model.num_classes} classes; {holds}.'",
    ): ("adds what the weights are to check_match's message"),
    ("qkv_vit/train/evaluators.py", "f'Data {self}: {error}{hint}'"): "names the data spec in a DataConfigError",
    ("qkv_vit/train/fine_tuning.py", "f'config.init_from: {error}'"): "names the key in weights.py's message",
    ("qkv_vit/train/fine_tuning.py", "f'{error} {architecture_difference(model, weights.architecture)}'.rstrip()"): (
        "adds the flags that match the architecture to check_fine_tuning_fit's message"
    ),
    ("qkv_vit/train/distillation.py", "f'config.distillation.teacher_path: {error}'"): (
        "names the key in weights.py's message"
    ),
    ("qkv_vit/evaluate/evaluation.py", "f'--baseline: {error}'"): "names the flag in corruption.summary's message",
}


def user_error_classes(trees: dict[str, ast.Module]) -> set[str]:
    """The classes main.py exits with one `error:` line for (EXIT_CODES), and every subclass of one."""
    exit_codes = next(
        node.value
        for node in ast.walk(trees["qkv_vit/main.py"])
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXIT_CODES" for t in node.targets)
    )
    found = {key.id for key in exit_codes.keys}
    while True:
        more = {
            node.name
            for tree in trees.values()
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and any(name_of(base) in found for base in node.bases)
        }
        if more <= found:
            return found
        found |= more


def name_of(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


class Resolver:
    """The texts a message expression can have: literal parts, and names, placeholders and helper functions'
    returns resolved where they are literal too; what cannot be resolved is UNKNOWN."""

    def __init__(self, trees: dict[str, ast.Module]):
        self.parents: dict[ast.AST, ast.AST] = {}
        self.functions: dict[str, list[tuple[ast.FunctionDef, str]]] = {}
        self.constants: dict[str, dict[str, ast.AST]] = {}
        self.trees = trees
        self.path_of: dict[ast.AST, str] = {}
        for path, tree in trees.items():
            self.constants[path] = {
                target.id: node.value
                for node in tree.body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for node in ast.walk(tree):
                self.path_of[node] = path
                for child in ast.iter_child_nodes(node):
                    self.parents[child] = node
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, []).append((node, path))
        self.active: set[int] = set()

    def enclosing_functions(self, node: ast.AST) -> list[ast.AST]:
        found = []
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                found.append(node)
        return found

    def assigned(self, name: str, node: ast.AST, path: str) -> list[ast.AST] | None:
        """The values assigned to `name` in the innermost function that assigns it, else at module level."""
        for function in self.enclosing_functions(node):
            values = [
                child.value
                for child in ast.walk(function)
                if isinstance(child, (ast.Assign, ast.AnnAssign))
                and child.value is not None
                and any(
                    getattr(t, "id", None) == name for t in getattr(child, "targets", [getattr(child, "target", None)])
                )
            ]
            if values:
                return values
            arguments = function.args
            if name in [a.arg for a in arguments.args + arguments.kwonlyargs + arguments.posonlyargs]:
                return None  # a parameter: whatever the caller passes
        value = self.constants[path].get(name)
        return [value] if value is not None else None

    def function(self, name: str, node: ast.AST, path: str, anywhere: bool) -> tuple[ast.FunctionDef, str] | None:
        """The function `name` means at `node`: one defined in an enclosing function, else in its module, else (if
        `anywhere`) the one function of that name in the sources."""
        for scope in [*self.enclosing_functions(node), self.trees[path]]:
            for child in ast.walk(scope):
                if isinstance(child, ast.FunctionDef) and child.name == name and self.scope_of(child) is scope:
                    return child, path
        definitions = self.functions.get(name, []) if anywhere else []
        return definitions[0] if len(definitions) == 1 else None

    def scope_of(self, node: ast.AST) -> ast.AST:
        functions = self.enclosing_functions(node)
        return functions[0] if functions else self.trees[self.path_of[node]]

    def returns(self, name: str, node: ast.AST, path: str, anywhere: bool = True) -> list[str] | None:
        """The texts the function `name` (at `node`) can return, None where it is not one of the sources'."""
        found = self.function(name, node, path, anywhere)
        if found is None:
            return None
        function, where = found
        values = [
            child.value
            for child in ast.walk(function)
            if isinstance(child, ast.Return)
            and child.value is not None
            and self.enclosing_functions(child)[0] is function
        ]
        return [text for value in values for text in self.texts(value, where)] or None

    def texts(self, node: ast.AST, path: str) -> list[str]:
        """Every text `node` can have (UNKNOWN where it cannot be told)."""
        if id(node) in self.active:
            return [UNKNOWN]
        self.active.add(id(node))
        try:
            found = self._texts(node, path)
        finally:
            self.active.discard(id(node))
        found = list(dict.fromkeys(found))
        return found if len(found) <= MAX_VARIANTS else [UNKNOWN]

    def _texts(self, node: ast.AST, path: str) -> list[str]:
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        if isinstance(node, ast.JoinedStr):
            variants = [""]
            for part in node.values:
                options = [part.value] if isinstance(part, ast.Constant) else self.placeholder(part.value, path)
                variants = [v + o for v in variants for o in options]
                if len(variants) > MAX_VARIANTS:
                    return [UNKNOWN]
            return variants
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return [a + b for a in self.texts(node.left, path) for b in self.texts(node.right, path)]
        if isinstance(node, ast.IfExp):
            return self.texts(node.body, path) + self.texts(node.orelse, path)
        if isinstance(node, ast.Name):
            values = self.assigned(node.id, node, path)
            if values:
                return [t for value in values for t in self.texts(value, path)]
            return self.returns(node.id, node, path, anywhere=False) or [UNKNOWN]  # storage_failures' message function
        if isinstance(node, ast.Lambda):
            return self.texts(node.body, path)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):  # a module constant's entry
            table = self.constants[path].get(node.value.id)
            if isinstance(table, ast.Dict):
                return [t for value in table.values for t in self.texts(value, path)]
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("rstrip", "strip"):
                return [t.strip() for t in self.texts(node.func.value, path)]
            returns = self.returns(name_of(node.func) or "", node, path)
            if returns:
                return returns
        return [UNKNOWN]

    def placeholder(self, node: ast.AST, path: str) -> list[str]:
        """A placeholder's texts where it is a name or helper with literal values, else UNKNOWN."""
        if isinstance(node, (ast.Name, ast.Subscript, ast.IfExp, ast.JoinedStr, ast.Constant)):
            return self.texts(node, path)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            return self.texts(node, path)
        return [UNKNOWN]


FORWARDERS = ("fail", "bad")  # config_file.fail prints its message; config_file.load's bad raises it as ConfigError


def catalogue() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, the message's source, its texts) of every user-error message in the sources."""
    trees = {
        str(path.relative_to(REPO)): ast.parse(path.read_text(), str(path))
        for directory in SOURCE_DIRS
        for path in sorted((REPO / directory).rglob("*.py"))
    }
    resolver = Resolver(trees)
    classes = user_error_classes(trees)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            called, message = name_of(node.func), node.args[0]
            texts = resolver.texts(message, path)
            is_error_print = (
                called == "print"
                and any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords)
                and any(t.startswith("error:") for t in texts)
            )
            if (
                called in classes
                or called in FORWARDERS
                or called == "storage_failures"
                or (called == "SystemExit" and texts != [])
                or (isinstance(node.func, ast.Attribute) and ast.unparse(node.func) == "parser.error")
                or (isinstance(node.func, ast.Name) and raises_a_user_error_type(resolver, node.func, classes))
                or is_error_print
            ):
                found.append((path, node.lineno, ast.unparse(message), texts))
    return found


def raises_a_user_error_type(resolver: Resolver, func: ast.Name, classes: set[str]) -> bool:
    """Whether `func` is a parameter annotated type[UserError] (config_rules' `error`)."""
    for function in resolver.enclosing_functions(func):
        for argument in function.args.args + function.args.kwonlyargs:
            if argument.arg == func.id and argument.annotation is not None:
                annotation = ast.unparse(argument.annotation)
                return annotation.startswith("type[") and annotation[5:-1] in classes
    return False


def problem_and_fix(text: str) -> bool:
    """Whether a message's text states a fix (FIX) in words of its own, besides what it passes on."""
    return bool(FIX.search(text.removeprefix("error:").strip()))


def has_text_of_its_own(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]{3}", text.removeprefix("error:").replace(UNKNOWN, "")))


CATALOGUE = catalogue()


def test_the_catalogue_is_found():
    print(f"{len(CATALOGUE)} user-error messages checked")
    assert len(CATALOGUE) >= MIN_MESSAGES
    assert any("Image folder path" in source for _, _, source, _ in CATALOGUE)  # the issue's own example


@pytest.mark.parametrize(
    "text",
    [
        "Image folder path /data/x does not exist.",
        "Global batch size 10 is not divisible by the process count 3.",
        "Bad split 'tset' for cifar10. Valid splits: ['test', 'train'].",
        "error: --processes must be >= 1",
        "The run has 0 steps.",
        "No checkpoint set in /w can be read.",  # a fix word, but no clause of its own
        "--config={…}: {…}",
    ],
)
def test_the_checker_refuses_a_message_without_a_fix(text):
    assert not problem_and_fix(text)


@pytest.mark.parametrize(
    "text",
    [
        "Image folder path /data/x does not exist: give data.path a folder of <split>/<class>/<image> files.",
        "Global batch size 10 is not divisible by the process count 3: set config.global_batch_size to a multiple.",
        "error: --processes must be >= 1; leave it out for one process",
        "The run has 0 steps: set config.total_steps or config.total_epochs higher.",
        "Choose one sweep listing, not ['a', 'b'].",
        "importlib_resources is missing: pip install importlib_resources",
        "Unknown flag --x. See --helpfull for the flags.",
    ],
)
def test_the_checker_accepts_a_message_with_a_fix(text):
    assert problem_and_fix(text)


def passed_on_reason(path: str, source: str) -> str | None:
    return PASSED_ON.get((path, source))


@pytest.mark.parametrize("path, line, source, texts", CATALOGUE, ids=[f"{p}:{n}" for p, n, _, _ in CATALOGUE])
def test_every_user_error_message_says_how_to_fix_it(path, line, source, texts):
    if passed_on_reason(path, source):
        return
    assert any(has_text_of_its_own(t) for t in texts), f"{path}:{line}: no text of its own; list it in PASSED_ON"
    lacking = [t for t in texts if not problem_and_fix(t)]
    assert not lacking, f"{path}:{line}: says what is wrong but not what to do: {lacking[0]!r}"


def test_every_passed_on_message_is_still_in_the_sources_and_needs_the_exception():
    found = {(path, source): texts for path, _, source, texts in CATALOGUE}
    assert not [key for key in PASSED_ON if key not in found]
    assert not [key for key in PASSED_ON if key in found and all(problem_and_fix(t) for t in found[key])]
