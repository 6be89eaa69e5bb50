"""The main window's pages, one per task: models, chat, batch, monitor, server."""
