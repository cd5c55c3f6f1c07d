from fact_lightning.data import schema, shards


def test_split_group_orders_images_and_strips_prefixes():
    sample = {"__key__": "000000_0000", schema.GROUP: b"g",
              "01.crop.jpg": b"c1", "00.crop.jpg": b"c0", "00.meta.json": b"m0", "01.meta.json": b"m1"}
    group, images = schema.split_group(sample)
    assert group == b"g"
    assert [im[schema.CROP] for im in images] == [b"c0", b"c1"]
    assert images[1][schema.META] == b"m1"


def test_image_key_and_constants():
    assert schema.image_key(3, schema.CROP) == "03.crop.jpg"
    assert shards.shard_name(7) == "shard-000007.tar" and shards.stats_name(7) == "shard-000007.stats.json"
    assert len(schema.LANDMARK_ORDER) == 5 and schema.TOKENS_DTYPE == "float16"
    assert len(set(schema.META_KEYS)) == len(schema.META_KEYS)
