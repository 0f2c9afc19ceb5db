"""The served ResNet18, for scripts and notebooks: load(settings) gives the Runtime the settings choose
(classifier.inference.runtime says what it provides; classifier.inference.runtimes how each is loaded).

    import model
    from classifier.settings import get_settings
    runtime = model.load(get_settings())
    runtime.predict(np.stack([runtime.prepare(data, max_pixels=50_000_000)]))
"""

from classifier.inference.runtime import NUM_CLASSES, Runtime
from classifier.inference.runtimes import load

__all__ = ["NUM_CLASSES", "Runtime", "load"]
