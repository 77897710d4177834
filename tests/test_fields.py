"""Fields: shapes, "same" padding, time conditioning, depth-varying parameters, and the diffrax
vector-field signature."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neuralode as no


@pytest.mark.parametrize("spatial_dims, shape", [(1, (2, 40, 4)), (2, (2, 8, 8, 4))])
@pytest.mark.parametrize("norm", [False, True])
def test_conv_field_keeps_the_shape_channels_last(spatial_dims, shape, norm):
    field = no.ConvField(4, 8, spatial_dims=spatial_dims, norm=norm, time_dependent=True,
                         param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    y = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    assert field(0.5, y).shape == shape


def test_conv_field_is_translation_equivariant_away_from_the_border():
    """"Same" padding: shifting the input shifts the output, except next to the padded border."""
    field = no.ConvField(2, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    y = jnp.zeros((1, 16, 16, 2)).at[0, 6, 6].set(1.0)
    shifted = field(0.0, jnp.roll(y, 2, axis=1))
    np.testing.assert_allclose(shifted[0, 4:12], jnp.roll(field(0.0, y), 2, axis=1)[0, 4:12],
                               atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda td: no.MLPField(3, 8, time_dependent=td, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
    lambda td: no.ConvField(3, 4, time_dependent=td, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
])
def test_time_conditioning(make):
    y = jax.random.normal(jax.random.key(2), (1, 5, 5, 3), jnp.float64)
    y = y if isinstance(make(False), no.ConvField) else y[0, 0]
    autonomous, conditioned = make(False), make(True)
    np.testing.assert_array_equal(autonomous(0.0, y), autonomous(1.0, y))
    assert float(jnp.max(jnp.abs(conditioned(0.0, y) - conditioned(1.0, y)))) > 1e-3


def test_depth_stack_has_a_leading_depth_axis_and_independent_layers():
    stack = no.DepthStack(lambda rngs: no.MLPField(3, 8, param_dtype=jnp.float64, rngs=rngs), 5,
                          rngs=nnx.Rngs(0))
    kernels = stack.layers.layers[0].kernel[...]
    assert kernels.shape == (5, 3, 8)
    assert len({float(jnp.sum(k)) for k in kernels}) == 5
    np.testing.assert_array_equal(stack.layer(3).layers[0].kernel[...], kernels[3])
    np.testing.assert_array_equal(stack.layer(jnp.int32(-1)).layers[0].kernel[...], kernels[4])
    with pytest.raises(TypeError, match="DepthStack has one field per step"):
        stack(0.0, jnp.ones(3))
    # JAX clamps an index beyond an array: layer(5) and layer(10) were layer 4, silently.
    for k in (5, 10, -6, 1.0, True):
        with pytest.raises(IndexError, match=r"k: expected an int in \[-5, 5\) for a DepthStack of "
                                             r"depth 5, got "):
            stack.layer(k)


@pytest.mark.parametrize("shape, kernel", [((2, 9, 3), (3,)), ((2, 7, 6, 3), (3, 3)),
                                           ((1, 8, 8, 2), (4, 4)), ((1, 5, 5, 2), (1, 1))])
def test_im2col_convolution_equals_xla(shape, kernel):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    w = jax.random.normal(jax.random.key(1), kernel + (shape[-1], 4), jnp.float64)
    numbers = ("NWC", "WIO", "NWC") if len(shape) == 3 else ("NHWC", "HWIO", "NHWC")
    expected = jax.lax.conv_general_dilated(x, w, (1,) * len(kernel), "SAME",
                                            dimension_numbers=numbers)
    np.testing.assert_allclose(no.fields.im2col_conv(x, w, (1,) * len(kernel), "SAME"), expected,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("make, shape", [
    (lambda: no.MLPField(3, 8, time_dependent=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
     (2, 3)),
    (lambda: no.ConvField(2, 4, time_dependent=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
     (1, 5, 5, 2)),
    (lambda: no.DepthStack(lambda rngs: no.MLPField(3, 4, param_dtype=jnp.float64, rngs=rngs), 2,
                           rngs=nnx.Rngs(0)).layer(1), (2, 3)),
])
def test_fields_are_diffrax_vector_fields(make, shape):
    """A field takes (t, y, args=None), so `diffrax.ODETerm(field)` is its vector field as it is."""
    field = make()
    y = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    np.testing.assert_array_equal(diffrax.ODETerm(field).vf(0.3, y, None), field(0.3, y))
    np.testing.assert_array_equal(field(0.3, y, {"ignored": 1.0}), field(0.3, y))


def test_compiled_init_builds_the_eager_module_in_one_program():
    """The same graph and variables as eager construction (random keys and counters exactly; the
    float32 parameters to the last bit, where LLVM may fuse a multiply-add differently), from one
    compiled program; under a transformation it is the plain construction, part of that program."""
    from neuralode.models import ODENet

    def make():
        return ODENet(1, 10, channels=(4, 8), spatial_dims=1, kinetic_weight=0.1,
                      rngs=nnx.Rngs(3))

    def arrays(module):  # path -> array, random keys as their bits
        return {path: jax.random.key_data(v[...]) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                else v[...] for path, v in nnx.to_flat_state(nnx.state(module))}

    eager, compiled = make(), no.compiled_init(make)
    assert nnx.graphdef(eager) == nnx.graphdef(compiled)
    expected, got = arrays(eager), arrays(compiled)
    assert expected.keys() == got.keys()
    for path, a in expected.items():
        b = got[path]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        ulp = float(jnp.finfo(a.dtype).eps) if jnp.issubdtype(a.dtype, jnp.floating) else 0.0
        np.testing.assert_allclose(b, a, rtol=2 * ulp, atol=0, err_msg=str(path))
    abstract = jax.eval_shape(lambda: nnx.state(no.compiled_init(make)))
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, nnx.state(eager))
