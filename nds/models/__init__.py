"""The model layer: U-ViT (one level of a nested chain) and Matryoshka's NestedUNet."""
