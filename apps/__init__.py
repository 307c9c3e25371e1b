"""Applications built on the difftune library (the Gradio studio: ``difftune app``)."""
