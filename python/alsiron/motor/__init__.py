"""Motor-cortex stage: label tables, template registration, precentral masks with
hemisphere/segment/depth sub-regions, iron indices and QC montages."""
