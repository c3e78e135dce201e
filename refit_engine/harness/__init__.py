"""The benchmark harness: the main job, the sweep, the memory dry run, the Kimi K2 model
builders and the megatron-core baseline. It uses the library (refit_engine) through its public
API; the library never imports the harness."""
