"""The model library: where models live (`model_store`), the local library and Hub pulls (`hub_models`), one Hub
repo's files (`hub_files`), Hub search (`hub_search`), and whether a model fits this machine (`machine`)."""
