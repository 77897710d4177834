from neuralode.models.unet import MultigridUNet
