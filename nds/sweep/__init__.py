"""The sweep layer: Ray Tune stages of trials, the level store, preflight, the Ray runtime, MDM runs, the papers' protocols, --plan and the CLI."""
