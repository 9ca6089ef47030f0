"""Prebuilt op modules land here when installed with TEMPO_BUILD_OPS=1."""
