"""The model library: where models live (`model_store`), the local library (`hub_models`), pulls from the Hub and
the ones left unfinished (`pulls`), one Hub repo's files (`hub_files`) and its GGUF files (`gguf_files`), Hub
search (`hub_search`), GGUF quantization types (`quant_types`), what a model will occupy in memory (`footprint`),
and whether it fits this machine (`machine`)."""
