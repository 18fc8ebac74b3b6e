"""The web console at ``/ui`` (docs/index.md): server-rendered pages, no front-end build."""
