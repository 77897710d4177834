from neuralode.models.unet import MultigridUNet
from neuralode.models.classifiers import AugmentedODENet, ODENet, PlainNet, ResNet, RKNet
