"""The kvstudio desktop app: PySide6 pages and widgets that react to the engine thread's signals."""
