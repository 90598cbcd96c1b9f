# The shipped MiniCanvas model, its classifiers and its concepts. Run by tests/test_docs.py.
# --8<-- [start:load]
import diffusers_unlearn as du

pipe = du.attach(du.minicanvas.load_pipeline())          # offline, checked against its manifest
style_of, object_of = du.minicanvas.load_classifiers()   # callables from images to label names
print(len(du.minicanvas.STYLES), "styles in", len(du.minicanvas.STYLE_FAMILIES), "families;",
      len(du.minicanvas.OBJECTS), "objects")
print(du.minicanvas.prompt("neon lines", "cat"))          # MiniCanvas's own prompt for a style and an object
# --8<-- [end:load]
