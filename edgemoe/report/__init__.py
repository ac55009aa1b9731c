"""What edgemoe shows people: text tables (`tables`) and a plan's heatmap (`heatmap`)."""
