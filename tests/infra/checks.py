"""The four checks that hold for the Bicep templates without a Bicep compiler.

Each check takes a project root (the real one, or a temporary copy with a
planted mistake) and returns a list of problems, one readable line each; an
empty list means the check passed.

1. ``syntax_problems``: every .bicep file parses with the tree-sitter-bicep
   grammar with no ERROR or MISSING node; identifiers resolve to a declaration;
   module calls pass known parameters (all required ones) and read outputs the
   module declares.
2. ``schema_problems``: every resource's ``Type@apiVersion`` exists in
   Microsoft's ARM template schemas (../shared/azure/arm-schemas), and every
   property the declaration sets, at every depth written as an object literal,
   is declared there (following ``$ref`` into common/definitions.json);
   literal values must fit the declared type and enum.
3. ``settings_problems``: the app settings the Bicep gives the Function App
   equal what the app reads: the names ``Settings.from_env`` reads (found with
   ``ast`` in mailsync/settings.py), the ``%NAME%`` binding expressions and
   binding connections under functions/, plus the host's own
   AzureWebJobs*/FUNCTIONS_*/APPLICATIONINSIGHTS_* settings. Secrets (fields
   declared ``repr=False``) must be Key Vault references, and every default
   the Bicep sets must mean the same as the code's default.
4. ``role_problems``: each data-plane use has exactly one role assignment to
   the Function App's identity, scoped to the resource it serves; there are no
   other assignments, none at resource-group or subscription scope.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tests.infra import bicep_model as bm

BICEP_DIR = Path("infra") / "bicep"


def load_project(root: Path) -> bm.Project:
    return bm.Project(bm.load(root / BICEP_DIR, root))


def _file(project: bm.Project, suffix: str) -> bm.BicepFile:
    for f in project.files.values():
        if f.rel.replace("\\", "/").endswith(suffix):
            return f
    raise FileNotFoundError(f"no Bicep file ending with {suffix}")


# =====================================================================================
# 1. Syntax
# =====================================================================================

# Names that are not declarations but resolve anyway: Bicep's namespaces.
_BUILTIN_NAMESPACES = {"az", "sys"}
_DECLARATIONS = {
    "parameter_declaration",
    "variable_declaration",
    "resource_declaration",
    "module_declaration",
    "output_declaration",
    "type_declaration",
    "user_defined_function",
}


def _loop_and_lambda_names(node: bm.Node) -> set[str]:
    """Names a for-loop or lambda declares for its body."""
    names: set[str] = set()
    if node.type == "for_statement":
        children = node.children
        for i, child in enumerate(children):
            if child.type == "for" and i + 1 < len(children):
                declared = children[i + 1]
                if declared.type == "identifier":
                    names.add(bm.text(declared))
                else:
                    names |= {
                        bm.text(n)
                        for n in bm.walk(declared)
                        if n.type in ("loop_variable", "loop_enumerator", "identifier")
                    }
    elif node.type == "lambda_expression":
        for child in node.children:
            if child.type == "=>":
                break
            names |= {bm.text(n) for n in bm.walk(child) if n.type == "identifier"}
    return names


def _is_reference(node: bm.Node) -> bool:
    parent = node.parent
    if parent is None:
        return False
    first = parent.named_children[0] if parent.named_children else None
    if parent.type == "object_property" and first == node:
        return False  # an object key
    if parent.type in _DECLARATIONS and first == node:
        return False  # the declared name
    if parent.type == "call_expression" and first == node:
        return False  # a function name
    if parent.type in ("for_statement", "lambda_expression", "for_loop_parameters"):
        return node.type == "identifier" and bm.text(node) not in _loop_and_lambda_names(parent)
    return True


def syntax_problems(root: Path) -> list[str]:
    project = load_project(root)
    problems: list[str] = []
    if not project.files:
        return [f"no .bicep files under {BICEP_DIR}"]
    for f in project.files.values():
        for node in bm.walk(f.root):
            if node.type == "ERROR":
                problems.append(
                    f"{f.rel}:{bm.line(node)}:{node.start_point[1] + 1}: syntax error at {bm.text(node)[:50]!r}"
                )
            elif node.is_missing:
                problems.append(f"{f.rel}:{bm.line(node)}:{node.start_point[1] + 1}: missing {node.type!r}")
        declared = set(f.params) | set(f.vars) | set(f.resources) | set(f.modules) | _BUILTIN_NAMESPACES
        for node in bm.walk(f.root):
            if node.type != "identifier" or not _is_reference(node):
                continue
            name = bm.text(node)
            if name in declared:
                continue
            scoped = False
            ancestor = node.parent
            while ancestor is not None:
                if name in _loop_and_lambda_names(ancestor):
                    scoped = True
                    break
                ancestor = ancestor.parent
            if not scoped:
                problems.append(f"{f.rel}:{bm.line(node)}: {name!r} is not declared")
        problems += _module_problems(project, f)
        problems += _secret_problems(f)
    return problems


# Functions that return account keys or connection strings with keys in them.
_KEY_FUNCTIONS = re.compile(r"^list(Keys|ConnectionStrings|AccountSas|ServiceSas|Secrets|Credentials?)$", re.IGNORECASE)


def _secret_problems(f: bm.BicepFile) -> list[str]:
    """No keys are fetched anywhere, and no @secure() parameter leaves through an output."""
    problems = []
    for node in bm.walk(f.root):
        if node.type != "call_expression":
            continue
        callee = node.named_children[0]
        name = bm.text(callee.named_children[-1]) if callee.type == "member_expression" else bm.text(callee)
        if _KEY_FUNCTIONS.match(name):
            problems.append(f"{f.rel}:{bm.line(node)}: {name}() reads keys; use the managed identity")
    secure = {name for name, param in f.params.items() if param.secure}
    for name, value in f.outputs.items():
        leaked = sorted(
            {bm.text(n) for n in bm.walk(value) if n.type == "identifier" and _is_reference(n) and bm.text(n) in secure}
        )
        if leaked:
            problems.append(f"{f.rel}: output {name} exposes @secure() parameter {', '.join(leaked)}")
    return problems


def _module_problems(project: bm.Project, f: bm.BicepFile) -> list[str]:
    problems = []
    for module in f.modules.values():
        target = project.module_file(module)
        where = f"{f.rel}:{bm.line(module.node)} module {module.symbol}"
        if target is None:
            problems.append(f"{where}: {module.path} does not exist")
            continue
        passed = {k for k, _, _ in bm.properties(bm.prop(module.body, "params"))}
        for name in sorted(passed - set(target.params)):
            problems.append(f"{where}: {target.rel} has no parameter {name!r}")
        for name, param in target.params.items():
            if param.default is None and name not in passed:
                problems.append(f"{where}: required parameter {name!r} of {target.rel} is not passed")
    # <module>.outputs.<name> must be an output of that module.
    for node in bm.walk(f.root):
        if node.type != "member_expression":
            continue
        base, member = node.named_children[0], node.named_children[-1]
        if base.type == "member_expression" and bm.text(base.named_children[-1]) == "outputs":
            symbol = bm.text(base.named_children[0])
            module = f.modules.get(symbol)
            target = project.module_file(module) if module else None
            if target is not None and bm.text(member) not in target.outputs:
                problems.append(f"{f.rel}:{bm.line(node)}: {target.rel} has no output {bm.text(member)!r}")
    return problems


# =====================================================================================
# 2. Resource types, api versions and properties against the ARM schemas
# =====================================================================================

_COMMON_PREFIX = "https://schema.management.azure.com/schemas/common/definitions.json"
_EXPRESSION_REF = "/definitions/expression"
# Keys a Bicep resource body may hold that ARM handles outside the provider schema.
_BICEP_RESOURCE_KEYS = {"parent", "scope", "dependsOn"}


@cache
def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class _Schema:
    node: Any  # a JSON schema dict (or bool)
    doc: Path  # the file its local $refs resolve in
    name: str  # where it came from, for messages


class SchemaIndex:
    """Lookups in ../shared/azure/arm-schemas/<apiVersion>/<Provider>[.<Sub>].json."""

    def __init__(self, arm_root: Path) -> None:
        self.root = arm_root
        self.common = arm_root / "common" / "definitions.json"

    def resource(self, rtype: str, api: str) -> _Schema | None:
        folder = self.root / api
        provider = rtype.split("/")[0]
        if not folder.is_dir():
            return None
        for path in sorted(folder.glob(f"{provider}*.json")):
            if path.stem != provider and not path.stem.startswith(provider + "."):
                continue
            for key, schema in _json(path).get("resourceDefinitions", {}).items():
                declared = schema.get("properties", {}).get("type", {}).get("enum") or [schema.get("description")]
                if any(isinstance(t, str) and t.lower() == rtype.lower() for t in declared):
                    return _Schema(schema, path, f"{path.parent.name}/{path.name}#{key}")
        return None

    def versions(self, rtype: str) -> list[str]:
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and self.resource(rtype, d.name))

    def resolve(self, schema: _Schema) -> list[_Schema]:
        """The concrete alternatives a schema allows: $ref, oneOf/anyOf/allOf expanded, expressions dropped."""
        out: list[_Schema] = []
        self._expand(schema, out, 0)
        return out

    def _expand(self, schema: _Schema, out: list[_Schema], depth: int) -> None:
        node = schema.node
        if depth > 40 or not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if ref is not None:
            if ref.endswith(_EXPRESSION_REF):
                return
            target = self._ref(ref, schema.doc)
            if target is not None:
                self._expand(target, out, depth + 1)
            return
        alternatives = node.get("oneOf") or node.get("anyOf") or node.get("allOf")
        if alternatives:
            rest = {k: v for k, v in node.items() if k not in ("oneOf", "anyOf", "allOf", "description")}
            for alt in alternatives:
                if rest.get("properties") and isinstance(alt, dict) and "$ref" not in alt:
                    # Root-level properties (apiVersion, type) apply to every variant.
                    alt = {**alt, "properties": {**rest["properties"], **alt.get("properties", {})}}
                self._expand(_Schema(alt, schema.doc, schema.name), out, depth + 1)
            return
        out.append(schema)

    def _ref(self, ref: str, doc: Path) -> _Schema | None:
        location, _, pointer = ref.partition("#")
        if location == "":
            path = doc
        elif location == _COMMON_PREFIX:
            path = self.common
        else:
            return None
        node: Any = _json(path)
        for part in pointer.strip("/").split("/"):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return _Schema(node, path, pointer.rsplit("/", 1)[-1])


def _is_object(schema: _Schema) -> bool:
    node = schema.node
    return isinstance(node, dict) and (
        node.get("type") == "object" or "properties" in node or "additionalProperties" in node
    )


def _is_map(schema: _Schema) -> bool:
    extra = schema.node.get("additionalProperties")
    return extra is not None and extra is not False


def schema_problems(root: Path, arm_root: Path) -> list[str]:
    project = load_project(root)
    index = SchemaIndex(arm_root)
    problems: list[str] = []
    for f in project.files.values():
        for resource in f.resources.values():
            schema = index.resource(resource.type, resource.api_version)
            if schema is None:
                known = index.versions(resource.type)
                hint = f"versions in the schemas: {', '.join(known)}" if known else "type unknown to the schemas"
                problems.append(f"{resource.where()}: not in the ARM schemas ({hint})")
                continue
            if resource.existing or resource.body is None:
                continue
            variants = index.resolve(schema)
            name = project.evaluate(f, bm.prop(resource.body, "name"))
            if isinstance(name, str):
                variants = [v for v in variants if _name_matches(index, v, name)] or variants
            _check_object(index, project, f, resource.body, variants, resource, "", problems, top=True)
    return problems


def _name_matches(index: SchemaIndex, variant: _Schema, name: str) -> bool:
    """Whether a oneOf variant (sites/config: appsettings, web, ...) is the one for this child name."""
    name_schema = variant.node.get("properties", {}).get("name")
    if name_schema is None:
        return True
    for alt in index.resolve(_Schema(name_schema, variant.doc, variant.name)):
        pattern = alt.node.get("pattern")
        if pattern and re.search(pattern, f"parent/{name}"):
            return True
        if name in alt.node.get("enum", []):
            return True
        if not pattern and "enum" not in alt.node:
            return True
    return False


def _check_object(
    index: SchemaIndex,
    project: bm.Project,
    f: bm.BicepFile,
    obj: bm.Node,
    schemas: list[_Schema],
    resource: bm.Resource,
    path: str,
    problems: list[str],
    top: bool = False,
) -> None:
    objects = [s for s in schemas if _is_object(s)]
    if not objects:
        kinds = sorted({str(s.node.get("type")) for s in schemas if isinstance(s.node, dict)})
        if kinds:
            problems.append(f"{resource.where()}: {path or 'body'} is an object, the schema expects {'/'.join(kinds)}")
        return
    is_map = any(_is_map(s) for s in objects)
    written = {key for key, _, _ in bm.properties(obj)}
    # Required by every alternative. At the top, apiVersion/type are Bicep's to
    # write, and the generated schemas mark `properties` required even for
    # resources with nothing to set (userAssignedIdentities).
    required = set.intersection(*(set(s.node.get("required", [])) for s in objects))
    required -= {"apiVersion", "type", "properties"} if top else set()
    for key in sorted(required - written):
        problems.append(f"{resource.where()}: line {bm.line(obj)}: {path or 'body'} lacks required property {key!r}")
    for key, value, prop_node in bm.properties(obj):
        if key is None:
            continue  # a computed key: only maps take those
        if top and key in _BICEP_RESOURCE_KEYS:
            continue
        here = f"{path}.{key}" if path else key
        found = [
            _Schema(s.node["properties"][key], s.doc, s.name)
            for s in objects
            if isinstance(s.node.get("properties"), dict) and key in s.node["properties"]
        ]
        if not found and is_map:
            found = [
                _Schema(s.node["additionalProperties"], s.doc, s.name)
                for s in objects
                if isinstance(s.node.get("additionalProperties"), dict)
            ]
            if not found:
                continue
        if not found:
            known = sorted({k for s in objects for k in s.node.get("properties", {})})
            problems.append(
                f"{resource.where()}: line {bm.line(prop_node)}: {here!r} is not a property in "
                f"{objects[0].name} (known: {', '.join(known)})"
            )
            continue
        _check_value(index, project, f, value, found, resource, here, problems)


def _check_value(
    index: SchemaIndex,
    project: bm.Project,
    f: bm.BicepFile,
    value: bm.Node,
    schemas: list[_Schema],
    resource: bm.Resource,
    path: str,
    problems: list[str],
) -> None:
    concrete = [c for s in schemas for c in index.resolve(s)]
    if not concrete:
        return  # only an ARM expression fits; nothing more to say
    if value.type == "object":
        _check_object(index, project, f, value, concrete, resource, path, problems)
        return
    if value.type in ("array", "for_statement"):
        items = [_Schema(c.node["items"], c.doc, c.name) for c in concrete if isinstance(c.node.get("items"), dict)]
        if not items:
            if not any(c.node.get("type") == "array" for c in concrete):
                problems.append(f"{resource.where()}: {path} is an array, the schema does not take one")
            return
        elements = [bm._unwrap_body(value)] if value.type == "for_statement" else value.named_children
        elements = [e for e in elements if e is None or e.type != "comment"]
        for element in elements:
            if element is not None:
                _check_value(index, project, f, element, items, resource, f"{path}[]", problems)
        return
    literal = _literal(value)
    if literal is None:
        return  # an expression: Azure evaluates it
    types = {c.node.get("type") for c in concrete if isinstance(c.node, dict)}
    wanted = {"string": {"string"}, "bool": {"boolean"}, "int": {"integer", "number"}}[literal[0]]
    if None not in types and not (types & wanted):
        expected = "/".join(sorted(t for t in types if t))
        problems.append(f"{resource.where()}: {path} is a {literal[0]} literal, the schema expects {expected}")
        return
    enums = [c.node["enum"] for c in concrete if isinstance(c.node, dict) and "enum" in c.node]
    if literal[0] == "string" and enums and len(enums) == len(concrete):
        allowed = {v for e in enums for v in e}
        if literal[1] not in allowed:
            problems.append(f"{resource.where()}: {path} = {literal[1]!r} is not one of {sorted(allowed)}")


def _literal(node: bm.Node) -> tuple[str, Any] | None:
    if node.type == "string":
        value = bm.string_value(node)
        return None if value is None else ("string", value)
    if node.type == "boolean":
        return ("bool", bm.text(node) == "true")
    if node.type == "number":
        return ("int", int(bm.text(node)))
    return None


# =====================================================================================
# 3. Settings parity
# =====================================================================================

# Settings mailsync reads that a deployment to Azure must NOT set, and why
# (local development, or a key-bearing form where Azure uses the identity).
NOT_IN_AZURE = {
    "AzureWebJobsStorage": "a connection string carries the account key; Azure uses the identity-based "
    "AzureWebJobsStorage__accountName/__credential/__clientId instead",
    "GRAPH_SANDBOX_URL": "the local Graph sandbox; in Azure MS_CLIENT_ID is set and Microsoft Graph is used",
    "MAILSYNC_LOCAL_DIR": "local state for development (sandbox-only key); never used in Azure",
    "IMAP_ALLOW_INSECURE": "plaintext IMAP is for tests and local servers; a deployment keeps the default (off)",
    "IMAP_ALLOWED_HOSTS": "exceptions to the outbound address policy are for tests and local servers (a loopback "
    "Dovecot); a deployment connects to public addresses only",
    "AzureSignalRConnectionString": "a connection string carries the AccessKey (the devhost's); Azure uses the "
    "identity-based AzureSignalRConnectionString__serviceUri/__credential/__clientId (access keys are disabled)",
    "REQUESTS_CA_BUNDLE": "a private CA for an intercepting proxy on a developer's network; Azure's outbound "
    "TLS uses the platform's trust store",
    "CURL_CA_BUNDLE": "the same as REQUESTS_CA_BUNDLE under curl's name (requests reads both); not set in Azure",
}
# Settings the Functions host and its platform read themselves.
HOST_PREFIXES = ("AzureWebJobs", "FUNCTIONS_", "APPLICATIONINSIGHTS_")
# Binding decorators whose default connection is the host storage account.
_STORAGE_BINDINGS = {
    "queue_trigger",
    "queue_output",
    "queue_input",
    "blob_trigger",
    "blob_input",
    "blob_output",
    "table_input",
    "table_output",
}
_SIGNALR_TYPES = {"signalR", "signalRConnectionInfo", "signalRTrigger", "signalRNegotiation"}
_CONNECTION_KEYWORDS = {
    "connection",
    "connection_string_setting",
    "connectionStringSetting",
    "connectionStringSettingName",
}
_APP_SETTING_EXPRESSION = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_BINDING_CALL = re.compile(r"(_trigger|_input|_output|_binding)$")


@dataclass
class SettingsReads:
    """What mailsync/settings.py reads from the environment."""

    names: set[str] = field(default_factory=set)  # every environment name read
    by_field: dict[str, set[str]] = field(default_factory=dict)  # Settings field -> names behind it
    secret_fields: set[str] = field(default_factory=set)  # fields declared with repr=False

    @property
    def secret_names(self) -> set[str]:
        return {n for f in self.secret_fields for n in self.by_field.get(f, set())}


def _env_aliases(func: ast.FunctionDef) -> set[str]:
    """Local names in ``func`` that stand for the environment mapping."""
    aliases = {a.arg for a in func.args.args + func.args.kwonlyargs if a.arg in ("env", "e", "environ")}
    for node in ast.walk(func):
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if value is None:
            continue
        mentions_env = any(
            (isinstance(n, ast.Attribute) and n.attr == "environ") or (isinstance(n, ast.Name) and n.id in aliases)
            for n in ast.walk(value)
        )
        if mentions_env:
            aliases |= {t.id for t in targets if isinstance(t, ast.Name)}
    return aliases


def _env_reads(expr: ast.AST, aliases: set[str]) -> set[str]:
    """Environment names an expression reads: env.get("X"), env["X"], helper(env, "X", ...)."""

    def is_env(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in aliases) or (
            isinstance(node, ast.Attribute) and node.attr == "environ"
        )

    names: set[str] = set()
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "__getitem__", "pop") and is_env(func.value):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value)
            elif any(is_env(a) for a in node.args):
                names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
        elif isinstance(node, ast.Subscript) and is_env(node.value):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(node.slice.value)
        elif (
            isinstance(node, ast.Compare)
            and any(is_env(c) for c in node.comparators)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
        ):
            names.add(node.left.value)
    return names


def settings_reads(settings_py: Path) -> SettingsReads:
    """Scan mailsync/settings.py: which environment names it reads, per Settings field."""
    tree = ast.parse(settings_py.read_text(encoding="utf-8"))
    reads = SettingsReads()
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]:
        for stmt in cls.body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(stmt.value, ast.Call)
                and any(
                    k.arg == "repr" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in stmt.value.keywords
                )
            ):
                reads.secret_fields.add(stmt.target.id)
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        aliases = _env_aliases(func)
        if not aliases:
            continue
        reads.names |= _env_reads(func, aliases)
        # Locals that carry values read from the environment (client_id = e.get(...)).
        local: dict[str, set[str]] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                found = _env_reads(node.value, aliases) | _locals_in(node.value, local)
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        local[target.id] = local.get(target.id, set()) | found
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("cls", "Settings"):
                for kw in node.keywords:
                    if kw.arg:
                        reads.by_field[kw.arg] = _env_reads(kw.value, aliases) | _locals_in(kw.value, local)
    return reads


def _locals_in(expr: ast.AST, local: Mapping[str, set[str]]) -> set[str]:
    return {n for node in ast.walk(expr) if isinstance(node, ast.Name) for n in local.get(node.id, set())}


@dataclass
class BindingReads:
    """What the function bindings make the host read: %NAME% expressions and connections."""

    names: set[str] = field(default_factory=set)
    connections: set[str] = field(default_factory=set)


def binding_reads(python_files: Iterable[Path]) -> BindingReads:
    """Scan the binding decorators (`*_trigger`, `*_input`, `*_output`, `generic_*_binding`)."""
    found = BindingReads()
    for path in python_files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Module-level string constants, for bindings written as queue_name=SYNC_QUEUE.
        constants = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if not _BINDING_CALL.search(callee):
                continue
            keywords: dict[str, str] = {}
            for k in node.keywords:
                value = k.value
                if isinstance(value, ast.Name) and value.id in constants:
                    keywords[k.arg or ""] = constants[value.id]
                elif isinstance(value, ast.Constant) and isinstance(value.value, str):
                    keywords[k.arg or ""] = value.value
            for value in keywords.values():
                found.names |= set(_APP_SETTING_EXPRESSION.findall(value))
            explicit = {v for k, v in keywords.items() if k in _CONNECTION_KEYWORDS}
            found.connections |= explicit
            if explicit:
                continue
            if callee in _STORAGE_BINDINGS:
                found.connections.add("AzureWebJobsStorage")
            elif keywords.get("type") in _SIGNALR_TYPES:
                found.connections.add("AzureSignalRConnectionString")
    return found


def bicep_app_settings(project: bm.Project) -> dict[str, tuple[bm.BicepFile, bm.Node]]:
    """The Function App's app settings as the templates define them: name -> (file, value expression)."""
    settings: dict[str, tuple[bm.BicepFile, bm.Node]] = {}
    for f in project.files.values():
        for resource in f.resources.values():
            if (
                resource.type.lower() == "microsoft.web/sites/config"
                and bm.string_value(bm.prop(resource.body, "name")) == "appsettings"
            ):
                for key, value_file, value in project.object_entries(f, bm.prop(resource.body, "properties")):
                    settings[key] = (value_file, value)
            if resource.type.lower() == "microsoft.web/sites":
                site_config = bm.prop(bm.prop(resource.body, "properties"), "siteConfig")
                listed = bm.prop(site_config, "appSettings")
                for item in listed.named_children if listed is not None and listed.type == "array" else []:
                    if item.type == "comment":
                        continue
                    name = bm.string_value(bm.prop(item, "name"))
                    if name is not None:
                        settings[name] = (f, bm.prop(item, "value"))
    return settings


def app_python_files(root: Path) -> list[Path]:
    files = sorted((root / "functions").rglob("*.py")) if (root / "functions").is_dir() else []
    app = root / "function_app.py"
    return files + ([app] if app.exists() else [])


def settings_problems(root: Path, settings_type: Any = None) -> list[str]:
    """Names, secrets and defaults of the Bicep app settings against what the app reads.

    ``settings_type`` is mailsync.settings.Settings (passed in so that the
    defaults check uses the real code even for a planted copy of the project).
    """
    project = load_project(root)
    reads = settings_reads(root / "mailsync" / "settings.py")
    bindings = binding_reads(app_python_files(root))
    try:
        bicep = bicep_app_settings(project)
    except ValueError as exc:
        return [f"cannot read the app settings from the templates: {exc}"]
    if not bicep:
        return ["the templates define no app settings (Microsoft.Web/sites/config 'appsettings')"]
    problems: list[str] = []
    app_names = reads.names | bindings.names

    for name in sorted(NOT_IN_AZURE):
        if name not in app_names:
            problems.append(
                f"NOT_IN_AZURE lists {name}, which the app no longer reads: drop it from tests/infra/checks.py"
            )
        if name in bicep:
            problems.append(f"{name} is set in Bicep but must not be in Azure: {NOT_IN_AZURE[name]}")
    for name in sorted(app_names - set(NOT_IN_AZURE) - set(bicep)):
        problems.append(
            f"missing: the app reads {name} but the Bicep does not set it "
            "(add it to appSettings in infra/bicep/main.bicep, "
            "or to NOT_IN_AZURE in tests/infra/checks.py with a reason)"
        )
    for connection in sorted(bindings.connections):
        if connection not in bicep and not any(n.startswith(connection + "__") for n in bicep):
            problems.append(
                f"missing: a binding uses connection {connection} but the Bicep sets neither it nor {connection}__*"
            )
    for name in sorted(bicep):
        if name in app_names or name.startswith(HOST_PREFIXES) or name.split("__")[0] in bindings.connections:
            continue
        problems.append(f"dead: the Bicep sets {name}, which neither the app nor the host reads")

    for name in sorted(reads.secret_names & set(bicep)):
        f, value = bicep[name]
        content = value.named_children[0] if value.type == "string" and value.named_children else None
        if (
            content is None
            or content.type != "string_content"
            or not bm.text(content).startswith("@Microsoft.KeyVault(")
        ):
            problems.append(
                f"{f.rel}:{bm.line(value)}: {name} is a secret and must be a Key Vault reference, "
                f"not {bm.text(value)[:60]}"
            )

    if settings_type is not None:
        baseline = settings_type.from_env({})
        for name in sorted((reads.names & set(bicep)) - set(NOT_IN_AZURE)):
            f, value = bicep[name]
            known = project.evaluate(f, value)
            if known is bm.UNKNOWN:
                continue  # set per deployment (a parameter without default, a resource's address)
            try:
                configured = settings_type.from_env({name: bm.arm_string(known)})
            except Exception as exc:  # ConfigurationError: the Bicep default is invalid for the app
                problems.append(f"{f.rel}:{bm.line(value)}: {name}={known!r} is rejected by mailsync.settings: {exc}")
                continue
            if configured != baseline:
                problems.append(
                    f"{f.rel}:{bm.line(value)}: {name} defaults to {known!r} in Bicep, which differs from "
                    "mailsync.settings' default (keep one meaning of 'default')"
                )
    return problems


_TABLE_IN_DOCSTRING = re.compile(r"``<prefix>([A-Za-z0-9]+)``")


def code_tables(root: Path) -> set[str]:
    """Table-name suffixes the code uses: f"{...table_prefix}<suffix>" and ``<prefix>suffix`` in module docstrings."""
    suffixes: set[str] = set()
    for path in sorted((root / "mailsync").rglob("*.py")) + app_python_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        suffixes |= set(_TABLE_IN_DOCSTRING.findall(ast.get_docstring(tree) or ""))
        for node in ast.walk(tree):
            if not isinstance(node, ast.JoinedStr) or len(node.values) < 2:
                continue
            head, tail = node.values[0], node.values[1]
            prefix = head.value if isinstance(head, ast.FormattedValue) else None
            named = (isinstance(prefix, ast.Attribute) and prefix.attr == "table_prefix") or (
                isinstance(prefix, ast.Name) and prefix.id == "table_prefix"
            )
            if named and isinstance(tail, ast.Constant) and isinstance(tail.value, str):
                suffixes.add(tail.value)
    return suffixes


def table_problems(root: Path) -> list[str]:
    """The tables the Bicep creates are the ones the code uses (TABLE_PREFIX + suffix)."""
    project = load_project(root)
    main = _file(project, "main.bicep")
    if "tableSuffixes" not in main.vars:
        return ["main.bicep has no tableSuffixes variable"]
    declared = project.evaluate(main, main.vars["tableSuffixes"])
    if not isinstance(declared, list) or not all(isinstance(s, str) for s in declared):
        return ["main.bicep's tableSuffixes is not a list of literal names"]
    used = code_tables(root)
    problems = [
        f"the code uses table <prefix>{s} but the Bicep does not create it" for s in sorted(used - set(declared))
    ]
    problems += [
        f"the Bicep creates table <prefix>{s}, which the code does not use" for s in sorted(set(declared) - used)
    ]
    prefix = project.evaluate(main, main.params["tablePrefix"].default) if "tablePrefix" in main.params else None
    for suffix in declared:
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", f"{prefix}{suffix}"):
            problems.append(f"table name {prefix}{suffix} is not a valid Azure table name")
    return problems


# =====================================================================================
# 4. Least privilege
# =====================================================================================

ROLE_NAMES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "7e4f1700-ea5a-4f59-8f37-079cfe29dce3": "SignalR Service Owner",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
}
_BY_NAME = {v: k for k, v in ROLE_NAMES.items()}


@dataclass(frozen=True)
class Use:
    """One data-plane use by the Function App and the one role it needs, on one resource."""

    what: str
    scope_type: str
    role: str
    scope_name: str | None = None  # a container's name, when the type alone is ambiguous
    deployment_container: bool = False  # the container functionAppConfig deploys from


USES = (
    Use(
        "sync queue and its poison queue",
        "Microsoft.Storage/storageAccounts/queueServices",
        "Storage Queue Data Contributor",
    ),
    Use("mailsync tables", "Microsoft.Storage/storageAccounts/tableServices", "Storage Table Data Contributor"),
    Use(
        "Flex Consumption deployment package",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Storage Blob Data Contributor",
        deployment_container=True,
    ),
    Use(
        "host timer/singleton leases",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Storage Blob Data Owner",
        "azure-webjobs-hosts",
    ),
    Use(
        "host keys",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Storage Blob Data Owner",
        "azure-webjobs-secrets",
    ),
    Use("SignalR client tokens and output binding", "Microsoft.SignalRService/signalR", "SignalR Service Owner"),
    Use("Key Vault references (secrets)", "Microsoft.KeyVault/vaults", "Key Vault Secrets User"),
)


@dataclass
class Assignment:
    resource: bm.Resource
    scope: bm.Resource | None
    role: str | None  # role definition GUID


def _identity_principals(project: bm.Project) -> list[tuple[bm.BicepFile, bm.Node]]:
    """The expressions that denote the Function App identity's principal id."""
    identity = _file(project, "modules/identity.bicep")
    return [(identity, identity.outputs["principalId"])] if "principalId" in identity.outputs else []


def _deployment_container(project: bm.Project) -> bm.Resource | None:
    """The container resource functionAppConfig.deployment.storage.value points at."""
    for f in project.files.values():
        for resource in f.resources.values():
            if resource.type.lower() != "microsoft.web/sites":
                continue
            storage = bm.prop(
                bm.prop(bm.prop(bm.prop(resource.body, "properties"), "functionAppConfig"), "deployment"), "storage"
            )
            value = bm.prop(storage, "value")
            if value is None:
                continue
            parts = [c for c in value.named_children if c.type == "interpolation"] if value.type == "string" else []
            last = parts[-1].named_children[0] if parts else value
            for target_file, target in project.follow(f, last):
                if target.type == "member_expression" and bm.text(target.named_children[-1]) == "name":
                    container = target_file.resources.get(bm.text(target.named_children[0]))
                    if container is not None:
                        return container
    return None


def role_problems(root: Path) -> list[str]:
    project = load_project(root)
    problems: list[str] = []
    principals = _identity_principals(project)
    if not principals:
        return ["modules/identity.bicep has no principalId output: cannot tell who role assignments are for"]
    assignments: list[Assignment] = []
    for f in project.files.values():
        for resource in f.resources.values():
            if resource.type.lower() != "microsoft.authorization/roleassignments" or resource.existing:
                continue
            scope_node = bm.prop(resource.body, "scope")
            scope: bm.Resource | None = None
            if scope_node is None:
                problems.append(f"{resource.where()}: no scope, so it is granted on the whole resource group")
            elif scope_node.type == "identifier" and bm.text(scope_node) in f.resources:
                scope = f.resources[bm.text(scope_node)]
            else:
                problems.append(f"{resource.where()}: scope {bm.text(scope_node)} is not a resource of this file")
            props = bm.prop(resource.body, "properties")
            principal = bm.prop(props, "principalId")
            sources = project.follow(f, principal) if principal is not None else []
            if not sources or any((sf.path, sn) not in {(pf.path, pn) for pf, pn in principals} for sf, sn in sources):
                given = bm.text(principal) if principal else "missing"
                problems.append(f"{resource.where()}: principalId is not the Function App identity ({given})")
            if bm.string_value(bm.prop(props, "principalType")) != "ServicePrincipal":
                problems.append(f"{resource.where()}: principalType must be 'ServicePrincipal' (a managed identity)")
            role = _role_guid(project, f, bm.prop(props, "roleDefinitionId"))
            if role is None:
                problems.append(
                    f"{resource.where()}: roleDefinitionId is not a built-in role id known at template time"
                )
            assignments.append(Assignment(resource, scope, role))

    deployment_container = _deployment_container(project)
    if deployment_container is None:
        problems.append("cannot find the container functionAppConfig.deployment.storage deploys from")
    claimed: set[int] = set()
    for use in USES:
        matches = []
        for i, a in enumerate(assignments):
            if a.scope is None or a.scope.type.lower() != use.scope_type.lower():
                continue
            if use.deployment_container:
                if deployment_container is None or a.scope is not deployment_container:
                    continue
            elif (
                use.scope_name is not None
                and project.evaluate(a.scope.file, bm.prop(a.scope.body, "name")) != use.scope_name
            ):
                continue
            matches.append(i)
        if len(matches) != 1:
            problems.append(
                f"{use.what}: expected exactly one role assignment scoped to its {use.scope_type}, found {len(matches)}"
            )
            continue
        claimed.add(matches[0])
        a = assignments[matches[0]]
        if a.role is not None and a.role != _BY_NAME[use.role]:
            problems.append(f"{a.resource.where()}: {use.what} needs {use.role}, not {ROLE_NAMES.get(a.role, a.role)}")
    for i, a in enumerate(assignments):
        if i not in claimed:
            scope = a.scope.where() if a.scope else "the resource group"
            role = ROLE_NAMES.get(a.role or "", a.role)
            problems.append(f"{a.resource.where()}: grants {role} on {scope}, which no data-plane use needs")
    return problems


def _role_guid(project: bm.Project, f: bm.BicepFile, node: bm.Node | None) -> str | None:
    """The GUID in subscriptionResourceId('Microsoft.Authorization/roleDefinitions', <guid>)."""
    if node is None or node.type != "call_expression" or bm.text(node.named_children[0]) != "subscriptionResourceId":
        return None
    args = node.named_children[1].named_children
    if len(args) != 2 or bm.string_value(args[0]) != "Microsoft.Authorization/roleDefinitions":
        return None
    value = project.evaluate(f, args[1])
    return value.lower() if isinstance(value, str) else None


# =====================================================================================
# azd: azure.yaml and main.parameters.json agree with the templates
# =====================================================================================

_AZD_HOSTS = {"function": "Microsoft.Web/sites", "staticwebapp": "Microsoft.Web/staticSites"}
_ENV_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def _service_tags(project: bm.Project) -> dict[str, list[bm.Resource]]:
    """azd-service-name tag value -> resources carrying it."""
    tagged: dict[str, list[bm.Resource]] = {}
    for f in project.files.values():
        for resource in f.resources.values():
            tags = bm.prop(resource.body, "tags")
            if tags is None:
                continue
            try:
                entries = project.object_entries(f, tags)
            except ValueError:
                continue
            for key, value_file, value in entries:
                if key == "azd-service-name":
                    name = project.evaluate(value_file, value)
                    if isinstance(name, str):
                        tagged.setdefault(name, []).append(resource)
    return tagged


def azd_problems(root: Path) -> list[str]:
    import yaml  # PyYAML: requirements-dev.txt

    path = root / "azure.yaml"
    if not path.exists():
        return ["azure.yaml is missing at the project root"]
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(config.get("name", ""))):
        problems.append("azure.yaml: name must be lowercase letters, digits and hyphens")
    infra = config.get("infra", {})
    template = root / infra.get("path", "infra") / f"{infra.get('module', 'main')}.bicep"
    if infra.get("provider", "bicep") != "bicep" or not template.exists():
        problems.append(f"azure.yaml: infra does not point at a Bicep module ({template.relative_to(root)} missing)")
    project = load_project(root)
    tagged = _service_tags(project)
    services = config.get("services") or {}
    for name, service in services.items():
        host = service.get("host")
        if host not in _AZD_HOSTS:
            problems.append(f"azure.yaml: service {name} has host {host!r}; this deployment has {sorted(_AZD_HOSTS)}")
            continue
        if not (root / service.get("project", ".")).is_dir():
            problems.append(f"azure.yaml: service {name}: project folder {service.get('project')} does not exist")
        matches = [r for r in tagged.get(name, []) if r.type == _AZD_HOSTS[host]]
        if len(matches) != 1:
            problems.append(
                f"azure.yaml: service {name} needs exactly one {_AZD_HOSTS[host]} "
                f"tagged azd-service-name={name}, found {len(matches)}"
            )
    for name in sorted(set(tagged) - set(services)):
        problems.append(f"{tagged[name][0].where()}: tagged azd-service-name={name}, which azure.yaml does not define")

    params_path = template.with_name(f"{template.stem}.parameters.json")
    main = project.files.get(template.resolve())
    if main is not None and params_path.exists():
        values = json.loads(params_path.read_text(encoding="utf-8")).get("parameters", {})
        for name, entry in values.items():
            if name not in main.params:
                problems.append(f"{params_path.name}: {name} is not a parameter of {template.name}")
            elif main.params[name].secure and not _ENV_REFERENCE.match(str(entry.get("value", ""))):
                problems.append(
                    f"{params_path.name}: {name} is @secure(); give it as ${{ENV_VAR}}, never a value in the repository"
                )
        for name, param in main.params.items():
            if param.default is None and name not in values:
                problems.append(
                    f"{params_path.name}: required parameter {name} is missing (azd would prompt every time)"
                )
    return problems


def host_problems(root: Path) -> list[str]:
    """host.json suits this deployment: Flex Consumption's bundle, and the /api prefix the Static Web App proxies."""
    path = root / "host.json"
    if not path.exists():
        return ["host.json is missing at the project root"]
    host = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if host.get("version") != "2.0":
        problems.append('host.json: version must be "2.0"')
    bundle = host.get("extensionBundle") or {}
    lower = re.match(r"^\[\s*(\d+)", str(bundle.get("version", "")))
    if bundle.get("id") != "Microsoft.Azure.Functions.ExtensionBundle" or lower is None or int(lower.group(1)) < 4:
        problems.append(
            "host.json: Flex Consumption needs extensionBundle Microsoft.Azure.Functions.ExtensionBundle "
            f"[4.0.0, 5.0.0) or later (queue and SignalR bindings come from it), not {bundle or 'none'}"
        )
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    if prefix != "api":
        problems.append(
            f"host.json: routePrefix is {prefix!r}; the Static Web App forwards only /api/* to the Function App"
        )
    return problems


def _routes(root: Path) -> set[str]:
    """HTTP routes the function blueprints register (route="..." of @bp.route)."""
    routes = set()
    for path in app_python_files(root):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "route":
                for k in node.keywords:
                    if k.arg == "route" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str):
                        routes.add(k.value.value.strip("/"))
    return routes


def output_url_problems(root: Path) -> list[str]:
    """Outputs built on PUBLIC_BASE_URL (redirect URI, webhook URL) name routes the app really serves."""
    project = load_project(root)
    main = _file(project, "main.bicep")
    settings = bicep_app_settings(project)
    if "PUBLIC_BASE_URL" not in settings:
        return ["the Bicep sets no PUBLIC_BASE_URL"]
    base_file, base = settings["PUBLIC_BASE_URL"]
    host_json = root / "host.json"
    prefix = "api"
    if host_json.exists():
        prefix = (
            json.loads(host_json.read_text(encoding="utf-8"))
            .get("extensions", {})
            .get("http", {})
            .get("routePrefix", "api")
        )
    routes = _routes(root)
    problems = []
    checked = 0
    for name, value in main.outputs.items():
        parts = value.named_children if value.type == "string" else []
        if len(parts) != 2 or parts[0].type != "interpolation" or parts[1].type != "string_content":
            continue
        if project.follow(main, parts[0].named_children[0]) != project.follow(base_file, base):
            continue
        checked += 1
        path = bm.text(parts[1])
        route = path.removeprefix(f"/{prefix}/") if path.startswith(f"/{prefix}/") else None
        if route not in routes:
            problems.append(f"main.bicep output {name} = PUBLIC_BASE_URL + {path}, which no function serves")
    if checked == 0:
        problems.append("main.bicep has no output built on PUBLIC_BASE_URL (redirect URI, webhook URL)")
    return problems


_ASSET = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"'#?]+)""", re.IGNORECASE)


def _ignored(rel: str, patterns: list[str]) -> bool:
    """A small .gitignore matcher: directory patterns (x/) and globs, enough for this repository."""
    from fnmatch import fnmatch

    parts = rel.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            folder = pattern.rstrip("/")
            if "/" in folder:
                if rel.startswith(folder + "/"):
                    return True
            elif folder in parts[:-1]:
                return True
        elif fnmatch(rel, pattern) or fnmatch(parts[-1], pattern):
            return True
    return False


def web_asset_problems(root: Path) -> list[str]:
    """Everything the pages load is in the folder azd uploads, and git-ignored (built) files are built by azd."""
    import yaml  # PyYAML: requirements-dev.txt

    config = yaml.safe_load((root / "azure.yaml").read_text(encoding="utf-8"))
    gitignore = root / ".gitignore"
    patterns = [
        line.strip()
        for line in (gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else [])
        if line.strip() and not line.startswith("#")
    ]
    problems = []
    for name, service in (config.get("services") or {}).items():
        if service.get("host") != "staticwebapp":
            continue
        folder = root / service.get("project", ".") / service.get("dist", ".")
        hook = ((service.get("hooks") or {}).get("prepackage") or {}).get("run", "")
        hook_text = " ".join(hook) if isinstance(hook, list) else str(hook)
        for page in sorted(folder.glob("*.html")):
            for reference in _ASSET.findall(page.read_text(encoding="utf-8")):
                if ":" in reference or reference.startswith("/"):
                    continue  # absolute URLs, /api/... (proxied to the Function App)
                asset = (page.parent / reference).resolve()
                rel = asset.relative_to(root.resolve()).as_posix()
                if not asset.exists():
                    problems.append(
                        f"{page.relative_to(root)} loads {reference}, which is not in {folder.relative_to(root)}"
                    )
                elif _ignored(rel, patterns) and asset.name not in hook_text:
                    problems.append(
                        f"{page.relative_to(root)} loads {reference}, which git ignores (it is built), "
                        f"but azure.yaml's {name} prepackage hook does not build {rel}"
                    )
    return problems
