"""multipart/form-data bodies as the SDKs send them (``client.files.create``, ``client.audio.transcriptions``):
parsed in a worker thread by the callers, with bounded fields and file sizes. Shared by the families that take
uploads, so none imports another."""

from __future__ import annotations

import dataclasses
from typing import Any

from server.errors import InvalidRequest

MAX_FIELDS = 32


@dataclasses.dataclass(frozen=True)
class FilePart:
    field: str
    filename: str | None
    data: bytes  # at most ``limit + 1`` bytes: one more than the limit says it is over


def parse_multipart(body: bytes, content_type: str, limit: int) -> tuple[list[tuple[str, str]], list[FilePart]]:
    """The text fields and the file parts of a multipart body; InvalidRequest when it is not one (or has more than
    MAX_FIELDS fields, or fields that are not UTF-8). File parts are read up to ``limit + 1`` bytes."""
    import python_multipart
    from python_multipart.exceptions import FormParserError

    fields: list[tuple[str, str]] = []
    files: list[FilePart] = []

    def on_field(field: Any) -> None:
        if len(fields) >= MAX_FIELDS:
            raise InvalidRequest(f"The form has more than {MAX_FIELDS} fields.")
        try:
            fields.append((field.field_name.decode(), (field.value or b"").decode()))
        except UnicodeDecodeError as e:
            raise InvalidRequest("Form fields must be UTF-8 text.") from e

    def on_file(file: Any) -> None:
        file.file_object.seek(0)
        name = file.file_name.decode(errors="replace") if file.file_name else None
        files.append(FilePart(file.field_name.decode(errors="replace"), name, file.file_object.read(limit + 1)))

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        parser = python_multipart.create_form_parser(headers, on_field, on_file,
                                                     config={"MAX_MEMORY_FILE_SIZE": limit + 1})
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as e:
        raise InvalidRequest(f"The body is not a multipart form this route reads: {e}.") from e
    return fields, files


def the_file(files: list[FilePart], holding: str) -> FilePart:
    """The one file part, named ``file``; InvalidRequest otherwise (``holding`` says what it should hold)."""
    uploads = [f for f in files if f.field == "file"]
    if len(files) != 1 or not uploads:
        raise InvalidRequest(f"The form needs exactly one file part, named `file`, holding {holding}.", param="file")
    return uploads[0]
