"""Graph passes over torch.fx with no speech knowledge.

Each pass is one module with one public entry point: ``trace`` -> ``analyze_channels`` ->
``cost_model`` -> ``insert_gates`` / ``slim`` -> ``export_onnx``. Per-op knowledge lives in
``passes.rules`` (one registry, one entry per op kind).
"""
