from neuralode.models.unet import MultigridUNet
from neuralode.models.classifiers import ODENet, PlainNet, ResNet, RKNet
from neuralode.models.spec import ADJOINTS, SOLVERS, ModelSpec, build_model, rebuild
