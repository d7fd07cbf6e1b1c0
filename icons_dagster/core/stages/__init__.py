"""The stages over the artifact store: the kit every stage uses, and the ICONS, OFA and evaluation stages."""
