"""The compiler: graph analysis (discovery, branches, shapes, token axes), the passes and lowerings, and the
TensorRT check and build. It imports the contract only, never the runtimes or the application."""
