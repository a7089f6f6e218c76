"""Image operations over the store and the registry: pull, push, tag, rmi, save, load, import."""
