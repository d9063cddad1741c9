import selfspec.tree
