"""The tasks (synthetic images, CIFAR-10, TinyStories) and the batches drawn ahead of a step; imports only the core."""
