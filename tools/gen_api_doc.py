"""Write docs/api.md from the proto's own comments (a test keeps the two equal).

    .venv/bin/python tools/gen_api_doc.py [OUT]     # default docs/api.md

protoc (the pinned grpcio-tools) parses the proto with its source info, so every RPC,
message, field and enum value is documented by the comment above it in the proto.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "jobworker/v1/jobworker.proto"

# SourceCodeInfo paths: FileDescriptorProto field numbers, then the nested ones.
_MESSAGE, _ENUM, _SERVICE, _SYNTAX = 4, 5, 6, 12
_FIELD, _VALUE, _METHOD = 2, 2, 2

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def _descriptor() -> descriptor_pb2.FileDescriptorProto:
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'proto'}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                PROTO,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        name = field.type_name.removeprefix(".jobworker.v1.")
        return f"[{name}](#{name.lower()})" if not name.startswith(".") else name[1:]
    return _SCALARS[field.type]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


Comments = dict[tuple[int, ...], str]


def _service(file: descriptor_pb2.FileDescriptorProto, comments: Comments) -> list[str]:
    out = [
        f"## Service `{file.service[0].name}`",
        "",
        "| RPC | Request | Response | What it does |",
        "| --- | --- | --- | --- |",
    ]
    for m, method in enumerate(file.service[0].method):
        request = method.input_type.removeprefix(".jobworker.v1.")
        response = method.output_type.removeprefix(".jobworker.v1.")
        stream = "stream " if method.server_streaming else ""
        doc = comments.get((_SERVICE, 0, _METHOD, m), "")
        out.append(
            f"| `{method.name}` | [{request}](#{request.lower()}) | "
            f"{stream}[{response}](#{response.lower()}) | {_cell(doc)} |"
        )
    return out


def _field_type(
    message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto
) -> str:
    maps = {n.name: n for n in message.nested_type if n.options.map_entry}
    entry = maps.get(field.type_name.rsplit(".", 1)[-1])
    if entry is not None:
        key, value = (_type_name(x) for x in entry.field)
        return f"map<{key}, {value}>"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {_type_name(field)}"
    if field.proto3_optional:
        return f"optional {_type_name(field)}"
    return _type_name(field)


def _messages(file: descriptor_pb2.FileDescriptorProto, comments: Comments) -> list[str]:
    out = ["## Messages", ""]
    for i, message in enumerate(file.message_type):
        out += [f"### {message.name}", "", comments.get((_MESSAGE, i), ""), ""]
        if message.field:
            out += ["| Field | Type | What it is |", "| --- | --- | --- |"]
        for f, field in enumerate(message.field):
            doc = comments.get((_MESSAGE, i, _FIELD, f), "")
            out.append(f"| `{field.name}` | {_field_type(message, field)} | {_cell(doc)} |")
        out.append("")
    return out


def _enums(file: descriptor_pb2.FileDescriptorProto, comments: Comments) -> list[str]:
    out = ["## Enums", ""]
    for i, enum in enumerate(file.enum_type):
        out += [f"### {enum.name}", "", comments.get((_ENUM, i), ""), ""]
        out += ["| Value | Number | Meaning |", "| --- | --- | --- |"]
        for v, value in enumerate(enum.value):
            doc = comments.get((_ENUM, i, _VALUE, v), "")
            out.append(f"| `{value.name}` | {value.number} | {_cell(doc)} |")
        out.append("")
    return out


def render() -> str:
    """docs/api.md, as the proto says it."""
    file = _descriptor()
    comments = {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in file.source_code_info.location
        if loc.leading_comments
    }
    header = comments.get((_SYNTAX,), "")
    out = [
        "# API reference: `jobworker.v1`",
        "",
        "<!-- Generated by tools/gen_api_doc.py from the proto's comments; do not edit. -->",
        "",
        *[line.removeprefix(" ") for line in header.splitlines()],
        "",
        *_service(file, comments),
        "",
        *_messages(file, comments),
        *_enums(file, comments),
    ]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "api.md"
    target.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
